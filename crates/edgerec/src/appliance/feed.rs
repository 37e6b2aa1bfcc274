//! What flows into the recorder, below both its senders and itself: the [`Batch`] of
//! datagrams the ingest thread read in one round (their bytes in one buffer), and the
//! [`Msg`] the ingest thread and the control API send.
//!
//! Invariant: a batch's datagrams keep the order they were read in; each is handed out with
//! exactly its own bytes.

use std::net::SocketAddr;
use std::sync::mpsc::SyncSender;
use std::time::Instant;

use erec::format::Metadata;

use crate::appliance::session::{PauseApplied, Tagged};

/// One received datagram inside a [`Batch`].
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Where it arrived.
    pub local: SocketAddr,
    /// Where it came from.
    pub remote: SocketAddr,
    /// When it was read (at most one round after it arrived).
    pub at: Instant,
    /// Its position in the datagram journal, if it is kept there
    /// ([`crate::appliance::journal`]).
    pub journal: Option<u64>,
    start: usize,
    end: usize,
}

/// Datagrams of one round, their bytes in one buffer.
#[derive(Debug, Default)]
pub struct Batch {
    datagrams: Vec<Received>,
    bytes: Vec<u8>,
}

impl Batch {
    /// An empty batch with room for `datagrams` datagrams of `bytes` bytes in all.
    pub fn with_capacity(datagrams: usize, bytes: usize) -> Batch {
        Batch {
            datagrams: Vec::with_capacity(datagrams),
            bytes: Vec::with_capacity(bytes),
        }
    }

    /// Adds one datagram.
    pub fn push(&mut self, local: SocketAddr, remote: SocketAddr, at: Instant, data: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(data);
        self.datagrams.push(Received {
            local,
            remote,
            at,
            journal: None,
            start,
            end: self.bytes.len(),
        });
    }

    /// Adds one datagram the journal already holds at `pos`.
    pub fn push_journaled(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        at: Instant,
        data: &[u8],
        pos: u64,
    ) {
        self.push(local, remote, at, data);
        if let Some(d) = self.datagrams.last_mut() {
            d.journal = Some(pos);
        }
    }

    /// Empties it, keeping its memory for the next round.
    pub fn clear(&mut self) {
        self.datagrams.clear();
        self.bytes.clear();
    }

    /// Bytes of all its datagrams.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// How many datagrams.
    pub fn len(&self) -> usize {
        self.datagrams.len()
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    /// The datagrams from index `from` on, each with its bytes, to be noted in the journal.
    pub fn iter_mut_from(&mut self, from: usize) -> impl Iterator<Item = (&mut Received, &[u8])> {
        let bytes = &self.bytes;
        self.datagrams.iter_mut().skip(from).map(move |d| {
            let (s, e) = (d.start, d.end);
            (d, &bytes[s..e])
        })
    }

    /// Each datagram with its bytes, in the order received.
    pub fn iter(&self) -> impl Iterator<Item = (&Received, &[u8])> {
        self.datagrams
            .iter()
            .map(|d| (d, &self.bytes[d.start..d.end]))
    }
}

/// What the ingest thread sends.
#[derive(Debug)]
pub enum Msg {
    /// The datagrams of one ingest round, each with its arrival time.
    Batch(Batch),
    /// Metadata (a JSON object) for the recording on a port: written into the one in
    /// progress, or held for the next one there.
    Metadata {
        /// The local port.
        port: u16,
        /// The document.
        doc: Metadata,
        /// Told what became of it, if anyone asks.
        reply: Option<SyncSender<Tagged>>,
    },
    /// Pause (or resume) recording on a port: no media stored until resumed.
    Pause {
        /// The local port.
        port: u16,
        /// Pause (true) or resume (false).
        pause: bool,
        /// Told what became of it, if anyone asks.
        reply: Option<SyncSender<PauseApplied>>,
    },
    /// A SIPREC recording session started, changed or stopped (the SIP side's
    /// [`SipAction::Start`](crate::siprec::srs::SipAction::Start), `Change` or `Stop`).
    Siprec(crate::siprec::srs::SipAction),
    /// End every recording and return.
    Shutdown,
}
