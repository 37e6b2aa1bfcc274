//! The integration tests, one test binary: the library through its public API and the
//! `edgerec` binary end to end.

mod appliance;
mod cli;
mod common;
mod control;
mod deploy;
mod export;
mod http_store;
mod inbox;
mod kms;
mod lkm;
mod lkm_attacks;
mod proxy;
mod s3;
mod spool;
mod tamper;
mod vectors;
