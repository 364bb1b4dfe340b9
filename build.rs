//! Generates the gRPC code for the CSI contract and for kura's own agent API. protox
//! compiles the proto files in pure Rust, so building kura needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/csi.proto", "proto/agent.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Chunk data is passed on without copying it into a Vec.
        .bytes(".kura.agent.v1.ExportChunk.data")
        .compile_fds(descriptors)?;
    Ok(())
}
