//! The recording appliance, `edgerec run`: RTP in on a port range, one sealed package per
//! recording out to the spool, delivered to the store with retry.
//!
//! Data flows one way: [`ingest`] reads datagrams in batches ([`feed`]) and hands them to
//! the [`recorder`], which drives the sans-IO [`session`] (admission, streams, chunks,
//! timers) and seals what it says into package files of the [`spool`]; the [`uploader`]
//! delivers finished packages to the store on the sans-IO schedule of [`upload_queue`]. The
//! [`inbox`] seals files another system leaves; the [`control`] API tags and pauses calls;
//! [`kek_watch`] and [`kek_fetch`] keep the current public key, started by [`key_source`]; [`metrics`] counts
//! everything; [`config`] is the TOML configuration; [`run`] starts and stops the whole,
//! with one [`shutdown`] signal for every thread and task, [`reload`]s the config on SIGHUP,
//! on sockets that are passed by the
//! [`service_manager`] and handed back to it, so they outlive the process.

pub(crate) mod carry;
pub(crate) mod config;
pub(crate) mod control;
pub(crate) mod feed;
pub(crate) mod identity;
pub(crate) mod inbox;
pub(crate) mod ingest;
pub(crate) mod journal;
pub(crate) mod kek_fetch;
pub(crate) mod kek_watch;
pub(crate) mod key_source;
pub(crate) mod manifest;
pub(crate) mod manifests;
pub(crate) mod metrics;
pub(crate) mod outcomes;
pub(crate) mod recorder;
pub(crate) mod reload;
pub(crate) mod run;
pub(crate) mod service_manager;
pub(crate) mod session;
pub(crate) mod shutdown;
pub(crate) mod sockets;
pub mod spool;
pub(crate) mod upload_queue;
pub(crate) mod uploader;
