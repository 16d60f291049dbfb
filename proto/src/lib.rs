//! Generated gRPC code for the controller-to-controller and agent-to-controller services.

pub mod raft {
    tonic::include_proto!("deployer.raft.v1");
}

pub mod cluster {
    tonic::include_proto!("deployer.cluster.v1");
}

pub mod agent {
    tonic::include_proto!("deployer.agent.v1");
}
