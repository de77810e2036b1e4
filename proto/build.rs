//! Compiles `persona/v1/persona.proto` with the vendored protoc, and the proto3 JSON mapping of
//! its messages (pbjson: camelCase names, enum names as strings, 64-bit integers as strings,
//! bytes as base64) that the HTTP API transcodes with; output goes to OUT_DIR.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("persona_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .compile_protos(&["persona/v1/persona.proto"], &["."])?;
    pbjson_build::Builder::new().register_descriptors(&std::fs::read(&descriptors)?)?.build(&[".persona.v1"])?;
    println!("cargo:rerun-if-changed=persona/v1/persona.proto");
    Ok(())
}
