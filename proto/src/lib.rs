//! Generated types and service stubs for `persona.v1.PersonaService`.

pub mod v1 {
    tonic::include_proto!("persona.v1");
    // serde for every message and enum, per the proto3 JSON mapping.
    include!(concat!(env!("OUT_DIR"), "/persona.v1.serde.rs"));

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("persona_descriptor");
}
