//! Generates the message and service code for every file under `proto/`, plus a descriptor
//! set for gRPC server reflection. Needs `protoc` (Debian: protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not baked into the script: one build script may serve several checkouts.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "eagle/v1/generation.proto",
        "eagle/common/v1/common.proto",
        "eagle/worker/v1/worker.proto",
        "eagle/draft/v1/draft.proto",
    ];
    let paths: Vec<_> = files.iter().map(|f| root.join(f)).collect();
    for p in &paths {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("eagle_descriptor.bin"))
        .compile_protos(&paths, &[root])?;
    Ok(())
}
