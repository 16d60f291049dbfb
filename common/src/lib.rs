pub mod pki;
pub mod seal;
pub mod tls;
pub mod token;
