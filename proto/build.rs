fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/raft.proto", "proto/cluster.proto", "proto/agent.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // One variant (a deployment to run) is much larger than the others; messages are built
        // once per send, so boxing would buy nothing.
        .type_attribute(".deployer.agent.v1.ControllerMessage.body", "#[allow(clippy::large_enum_variant)]")
        .compile_fds(fds)?;
    Ok(())
}
