//! Compiles `persona/v1/persona.proto` with the vendored protoc; output goes to OUT_DIR.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("persona_descriptor.bin"))
        .compile_protos(&["persona/v1/persona.proto"], &["."])?;
    println!("cargo:rerun-if-changed=persona/v1/persona.proto");
    Ok(())
}
