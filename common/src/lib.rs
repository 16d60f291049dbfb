pub mod files;
pub mod grpc_client;
pub mod pki;
pub mod seal;
pub mod tls;
pub mod token;
