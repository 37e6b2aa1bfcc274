//! The integration tests, one test binary: the library through its public API and the
//! `edgerec` binary end to end.
// A test's or benchmark's unwrap is its report (the workspace denies it in the crates).
#![allow(clippy::unwrap_used)]

mod appliance;
mod cli;
mod common;
mod control;
mod deploy;
mod export;
mod export_bucket;
mod http_store;
mod inbox;
mod kms;
mod lkm;
mod lkm_attacks;
mod provenance;
mod proxy;
mod reload;
mod s3;
mod service_manager;
mod siprec;
mod spool;
mod tamper;
mod vectors;
