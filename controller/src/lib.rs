//! The Deployer controller: a Raft-replicated control plane (DESIGN.md sections 2, 3 and 6).

pub mod acme;
pub mod agents;
pub mod api;
pub mod command;
pub mod controller;
pub mod deploy;
pub use deployer_common::files;
pub mod githost;
pub mod grpc;
pub mod ingress;
pub mod node;
pub mod raft;
pub mod scheduler;
pub mod store;
pub mod util;
pub mod webhooks;

pub use node::{serve, ServeConfig};
