//! The `edgerec` command line: argument parsing and dispatch. Each command's work is in a
//! module of its own; this module only maps results to the exit codes of the interface
//! contract (0 success, 1 other error, 2 usage, 3 wrong key, 4 corrupt, 5 unterminated,
//! 6 unsupported version or suite).
//!
//! Its modules: `appliance` (`run`, `loadgen` and their logging), `package` (`keygen`,
//! `seal`, `open`, `inspect`, `export`), `spool` (`spool list/show/retry`), `lkm`
//! (`edgerec lkm …`, feature `lkm`), and `io` (`-` for standard input or output, files
//! written all-or-nothing).

#[cfg(feature = "appliance")]
mod appliance;
#[cfg(feature = "appliance")]
mod calls;
mod io;
#[cfg(feature = "lkm")]
mod lkm;
mod package;
#[cfg(feature = "appliance")]
mod spool;
#[cfg(feature = "appliance")]
mod verify_store;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use erec::format::Wrap;

/// edgerec: records contact-center calls as encrypted packages that only the
/// organisation's key can open.
#[derive(Debug, Parser)]
#[command(name = "edgerec", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Writes the manual page of every visible command into `dir`: `edgerec.1`, and
/// `edgerec-<command>[-<subcommand>].1` for each below it.
pub fn man_pages(dir: &std::path::Path) -> Result<(), crate::Error> {
    use clap::CommandFactory;
    fn pages(cmd: &clap::Command, name: &str, dir: &std::path::Path) -> Result<(), crate::Error> {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone().name(name.to_string()))
            .title(name.to_uppercase())
            .render(&mut page)?;
        std::fs::write(dir.join(format!("{name}.1")), page)?;
        // clap's own `help` subcommands are no commands of edgerec's.
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
    cmd.build();
    pages(&cmd, "edgerec", dir)
}

// Parsed once per process: the size of its largest variant (export's options) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the recording appliance: receive RTP on the ingest ports, seal every call into
    /// the spool, deliver the packages to the store. Stops cleanly on SIGTERM or SIGINT.
    #[cfg(feature = "appliance")]
    Run {
        /// The TOML configuration (relative paths in it resolve against its directory).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check an appliance configuration without starting anything: every key and value, and
    /// the files and environment variables it reads its secrets from. Exit 0 with a summary,
    /// or 1 with the one-line error `run` would stop with.
    #[cfg(feature = "appliance")]
    CheckConfig {
        /// The TOML configuration.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Send paced 20 ms G.711 µ-law test streams (two legs per port or one stream per port, distinct SSRCs, a
    /// 1,000 Hz tone on leg 0 and 1,500 Hz on leg 1) for sizing and benchmarks, or replay a
    /// captured call (--replay FILE.pcap).
    #[cfg(feature = "appliance")]
    Loadgen {
        /// Host or address to send to.
        #[arg(long)]
        target: String,
        /// Destination port range A-B (or one port), or a list P1,P2,… (a media server's
        /// allocated ports, in order).
        #[arg(long, value_name = "A-B|P1,P2,…")]
        ports: String,
        /// Number of streams.
        #[arg(long, default_value_t = 2)]
        streams: usize,
        /// Streams per port: 2 (the two legs of a call, as an SBC forking both directions to
        /// one port) or 1 (one port per stream, as SIPREC's m-lines).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
        per_port: u8,
        /// How long to send.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Seed for SSRCs and sequence numbers.
        #[arg(long, default_value_t = 1)]
        seed: u32,
        /// Instead of generated streams, send the UDP datagrams of this pcap file with their
        /// own timing (its lowest destination port goes to the first of --ports).
        #[arg(long, value_name = "FILE.pcap", conflicts_with_all = ["streams", "seconds", "seed"])]
        replay: Option<PathBuf>,
    },
    /// The spool: what waits for the store, and sending refused packages again. Needs no
    /// key and never deletes anything.
    #[cfg(feature = "appliance")]
    Spool {
        #[command(subcommand)]
        action: SpoolAction,
    },
    /// What became of every recording and refusal: the appliance's outcome journal
    /// (started, ended, salvaged, stored, failed; refusals per reason and second). Needs no
    /// key.
    #[cfg(feature = "appliance")]
    Calls {
        #[command(subcommand)]
        action: CallsAction,
    },
    /// The appliance's identity: its Ed25519 signing key pair (made at its first start, in
    /// `[identity] key_file`) and the appliance id derived from it.
    #[cfg(feature = "appliance")]
    Identity {
        #[command(subcommand)]
        action: IdentityAction,
    },
    /// The Local Key Manager's tools.
    Lkm {
        #[command(subcommand)]
        action: LkmAction,
    },
    /// Make a new RSA key-encryption key pair: DIR/<kek id>.pem (private, 0600) and
    /// DIR/<kek id>.pub.pem. Prints the kek id.
    ///
    /// The private key belongs off the recording appliance: in the key manager, or with
    /// whoever decrypts. The appliance needs only the .pub.pem file.
    Keygen {
        /// Directory to write the two files to (created 0700 if missing).
        #[arg(long)]
        out: PathBuf,
        /// Modulus size in bits (3072 to 4096).
        #[arg(long, default_value_t = 3072, value_parser = clap::value_parser!(u16).range(3072..=4096))]
        bits: u16,
    },
    /// Write the manual pages of every command into DIR (edgerec.1, edgerec-export.1, …;
    /// what the Debian packages install).
    #[command(hide = true)]
    Man {
        /// Where the pages go (made if missing).
        dir: PathBuf,
    },
    /// Seal a file into a package (media "file") for one to four recipients.
    Seal {
        /// A recipient's public key (SPKI or PKCS#1 PEM); repeat for up to four.
        #[arg(long = "kek", required = true, value_name = "PUB.pem")]
        keks: Vec<PathBuf>,
        /// How the data key is sealed to each recipient.
        #[arg(long, value_enum, default_value_t = WrapArg::OaepSha256)]
        wrap: WrapArg,
        /// Plaintext bytes per chunk (4096 to 16777216).
        #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
        chunk_size: u32,
        /// Worker threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// The file to seal, or - for standard input.
        input: PathBuf,
        /// The package to write, or - for standard output.
        output: PathBuf,
    },
    /// Verify and decrypt a package. Nothing unverified is released; a failed open to a
    /// file leaves no file.
    Open {
        #[command(flatten)]
        keys: KeySource,
        /// Accept a package that ends without its end record (after a crash) and write its
        /// verified prefix; exit 0 with a warning.
        #[arg(long)]
        allow_unterminated: bool,
        /// Worker threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// The package, or - for standard input.
        input: PathBuf,
        /// Where to write the plaintext, or - for standard output (then the exit status
        /// is the only signal of failure).
        output: PathBuf,
    },
    /// Decrypt recordings into the export layout:
    /// OUT/year=YYYY/month=MM/day=DD/conversation_id=ID/<recording id>.{wav|pcap} with a
    /// <recording id>_metadata.json beside it (a file package restores its original file);
    /// OUT is a directory or an S3 bucket.
    Export {
        #[command(flatten)]
        keys: KeySource,
        /// The output directory, or s3://BUCKET/PREFIX (with --out-config).
        #[arg(long)]
        out: PathBuf,
        /// For an s3:// --out: a file with a [store] table of the s3 keys (endpoint, region,
        /// credentials, TLS; not bucket or prefix, which the URL gives), optionally [upload]
        /// multipart_part_bytes and [export] organisation_id.
        #[cfg(feature = "appliance")]
        #[arg(long, value_name = "FILE")]
        out_config: Option<PathBuf>,
        /// For an s3:// --out: server-side encryption of every object (x-amz-server-side-
        /// encryption AES256 or aws:kms), confirmed by a HEAD after each upload.
        #[cfg(feature = "appliance")]
        #[arg(long, value_enum)]
        sse: Option<SseArg>,
        /// With --sse kms: the KMS key (id, ARN or alias); else the account's default key.
        #[cfg(feature = "appliance")]
        #[arg(long, value_name = "ID", requires = "sse")]
        sse_kms_key_id: Option<String>,
        /// For an s3:// --out: where packages read from an s3 store wait while they are
        /// exported (ciphertext, one a job; default a temporary directory under $TMPDIR,
        /// which may be memory).
        #[cfg(feature = "appliance")]
        #[arg(long, value_name = "DIR")]
        scratch: Option<PathBuf>,
        /// edgerec's layout, or the platform's bulk export layout:
        /// ORG/year=/month=/day=/hour=/conversation_id=ID/, files named by recording id, and
        /// the platform's _metadata.json fields (edgerec's under "edgerec").
        #[arg(long, value_enum, default_value_t = LayoutArg::Edgerec)]
        layout: LayoutArg,
        /// The organisation id, the first level of --layout platform (or [export]
        /// organisation_id of the --out-config).
        #[arg(long, value_name = "ID")]
        org_id: Option<String>,
        /// Audio as WAV (one channel per stream) or the original packets as pcap.
        #[arg(long, value_enum, default_value_t = FormatArg::Wav)]
        format: FormatArg,
        /// Package files, or directories searched for *.erec (a dir store, say).
        #[arg(required_unless_present = "store_config")]
        inputs: Vec<PathBuf>,
        /// Export from the recording store of this appliance config ([store]: dir or s3,
        /// with its prefix) instead of, or besides, INPUT paths.
        #[cfg(feature = "appliance")]
        #[arg(long, value_name = "FILE")]
        store_config: Option<PathBuf>,
        /// The first UTC day to export from the store (YYYY-MM-DD; by the object keys'
        /// {yyyy}/{mm}/{dd}/ layout), or the first time (2026-11-30T10:00Z: recordings begun
        /// from then on).
        #[cfg(feature = "appliance")]
        #[arg(long, value_name = "DATE", requires = "store_config")]
        from: Option<String>,
        /// The last UTC day (inclusive; default: --from), or the end time (exclusive:
        /// recordings begun before it; needed with a --from time).
        #[cfg(feature = "appliance")]
        #[arg(long, value_name = "DATE", requires = "from")]
        to: Option<String>,
        /// Packages exported at once (default: every core).
        #[arg(long)]
        jobs: Option<usize>,
        /// Encrypt every output to this OpenPGP certificate (armored or binary); repeat for
        /// several receivers. Outputs are written as <name>.pgp, encrypted as they are
        /// rendered: no plaintext reaches the disk.
        #[arg(long = "pgp-recipient", value_name = "CERT.asc")]
        pgp_recipients: Vec<PathBuf>,
        /// The longest recording timeline exported, from its start to its last sample; a
        /// recording that claims a longer one fails on its own.
        #[arg(long, value_name = "SECONDS", default_value_t = crate::export::DEFAULT_MAX_SPAN.as_secs())]
        max_span_secs: u64,
        /// Export only packages that a signed manifest of this appliance lists (its public
        /// key, as `edgerec identity show` printed it); repeat for several appliances. The
        /// manifests are read from the --store-config store; others are refused.
        #[cfg(feature = "appliance")]
        #[arg(
            long = "appliance-key",
            value_name = "PUB.pem",
            requires = "store_config"
        )]
        appliance_keys: Vec<PathBuf>,
        /// Export only recordings of this media type (call, email, chat, message, callback,
        /// screen, transcript: an inbox file's sidecar gives it, a recorded call is a call);
        /// repeat for several. Each package's metadata is opened to tell.
        #[arg(long = "media-type", value_name = "TYPE", value_parser = clap::builder::PossibleValuesParser::new(crate::media::MEDIA_TYPES))]
        media_types: Vec<String>,
        /// Export only the recordings of this conversation (repeat for several): found
        /// through the store's sealed manifests (with --store-config and --appliance-key),
        /// without decrypting the others.
        #[cfg(feature = "appliance")]
        #[arg(long = "conversation", value_name = "ID", requires = "appliance_keys")]
        conversations: Vec<String>,
        /// A file of conversation ids, one a line (blank lines and # comments ignored),
        /// as --conversation.
        #[cfg(feature = "appliance")]
        #[arg(
            long = "conversations",
            value_name = "FILE",
            requires = "appliance_keys"
        )]
        conversations_file: Option<PathBuf>,
        /// Export each package on its own. By default a call recorded in several packages
        /// (the appliance restarted during it, or it reached its maximum duration: each part
        /// names the one it continues) is exported as one recording, named after its first
        /// part, when any of its parts is selected.
        #[arg(long)]
        no_join: bool,
    },
    /// Prove a store complete and genuine: read its manifests (signed by each appliance's
    /// identity, chained), and report by recording id what is missing, altered, listed by no
    /// manifest (forged or orphaned), refused or failed, and every gap in a chain. Exit 0
    /// only when complete; 4 when the store does not hold what was signed; 1 when it is
    /// genuine but calls were refused, failed or are not stored yet.
    #[cfg(feature = "appliance")]
    VerifyStore {
        #[command(flatten)]
        keys: KeySource,
        /// An appliance config whose [store] (dir or s3, with its prefix) to verify; an http
        /// store cannot be listed.
        #[arg(long, value_name = "FILE")]
        store_config: PathBuf,
        /// A registered appliance's public key (`edgerec identity show`); repeat for each.
        #[arg(long = "appliance-key", value_name = "PUB.pem", required = true)]
        appliance_keys: Vec<PathBuf>,
        /// The first UTC day of recordings to check (YYYY-MM-DD), or the first time
        /// (2026-11-30T10:00Z); every manifest is read whatever the range.
        #[arg(long, value_name = "DATE")]
        from: Option<String>,
        /// The last UTC day (inclusive; default: --from), or the end time (exclusive).
        #[arg(long, value_name = "DATE", requires = "from")]
        to: Option<String>,
        /// One JSON report instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Show a package's header facts without any key.
    Inspect {
        /// Print JSON (recording_id, created_ms, media, kek_ids, wraps, max_chunk, records,
        /// terminated, bytes, and more).
        #[arg(long)]
        json: bool,
        /// The package, or - for standard input.
        file: PathBuf,
    },
}

/// Where the reading side gets data keys: private key files, the key manager, or both (key
/// files are asked first).
#[derive(Debug, Args)]
#[group(required = true, multiple = true)]
pub struct KeySource {
    /// A private key (PKCS#8 or PKCS#1 PEM); repeat to offer several.
    #[arg(long = "key", value_name = "PRIV.pem")]
    keys: Vec<PathBuf>,
    /// Unwrap through the Local Key Manager at this URL (https://host:port); the private
    /// keys stay there.
    #[cfg(feature = "appliance")]
    #[arg(long, value_name = "URL", requires = "lkm_credentials")]
    lkm: Option<String>,
    /// The key manager credential (the id: and key: lines `edgerec lkm credentials add`
    /// printed); EDGEREC_LKM_KEY in the environment replaces its key.
    #[cfg(feature = "appliance")]
    #[arg(long, value_name = "FILE", requires = "lkm")]
    lkm_credentials: Option<PathBuf>,
    /// The CA certificate that issued the key manager's (the only root trusted for it).
    #[cfg(feature = "appliance")]
    #[arg(long, value_name = "CA.pem", requires = "lkm")]
    lkm_ca: Option<PathBuf>,
    /// Who opens the recordings, for the key manager's audit log (PureCloud-User-Id;
    /// default: the user running this command).
    #[cfg(feature = "appliance")]
    #[arg(long, value_name = "USER", requires = "lkm")]
    lkm_user: Option<String>,
}

impl KeySource {
    /// The unwrapper these options name.
    fn unwrapper(&self) -> Result<Box<dyn erec::keys::Unwrapper>, crate::Error> {
        let ring = erec::keys::KeyRing::from_files(&self.keys)?;
        #[cfg(feature = "appliance")]
        if let (Some(url), Some(credentials)) = (&self.lkm, &self.lkm_credentials) {
            let client = edgerec_lkm::client::LkmClient::new(&edgerec_lkm::client::LkmTarget {
                url: url.clone(),
                ca_file: self.lkm_ca.clone(),
                credentials: credentials.clone(),
                timeout: std::time::Duration::from_secs(30),
                user: self
                    .lkm_user
                    .clone()
                    .unwrap_or_else(edgerec_lkm::client::os_user),
            })
            .map_err(|e| crate::Error::Invalid(e.to_string()))?;
            return Ok(Box::new(erec::keys::Either(ring, client)));
        }
        Ok(Box::new(ring))
    }
}

/// The `--layout` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LayoutArg {
    /// year=/month=/day=/conversation_id=/, by the recording's start day.
    Edgerec,
    /// ORG/year=/month=/day=/hour=/conversation_id=/, by the conversation's start hour.
    Platform,
}

/// The `--sse` values.
#[cfg(feature = "appliance")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SseArg {
    /// SSE-S3: AES256, keys the store manages.
    S3,
    /// SSE-KMS: aws:kms, with --sse-kms-key-id or the account's default key.
    Kms,
}

/// The `--format` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    /// 16-bit PCM WAV, one channel per stream.
    Wav,
    /// The original packets in UDP frames.
    Pcap,
}

/// What `edgerec spool` does.
#[cfg(feature = "appliance")]
#[derive(Debug, Subcommand)]
enum SpoolAction {
    /// Every package in the spool: ready (waiting for the store, with attempts, next attempt
    /// and last error), failed (refused for good), active (being recorded), quarantined.
    List {
        #[command(flatten)]
        at: SpoolAt,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One package's upload state, place and object key, as JSON.
    Show {
        #[command(flatten)]
        at: SpoolAt,
        /// The recording id.
        id: String,
    },
    /// Move failed packages back to ready/ (attempts reset, last error kept) so that they
    /// are sent again.
    Retry {
        #[command(flatten)]
        at: SpoolAt,
        /// Every package in failed/.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// The recording ids.
        #[arg(required_unless_present = "all")]
        ids: Vec<String>,
    },
}

/// What `edgerec calls` does.
#[cfg(feature = "appliance")]
#[derive(Debug, Subcommand)]
enum CallsAction {
    /// Every recording the journal names, oldest first, with its outcome (recording,
    /// spooled, stored, failed), and the refusals.
    List {
        #[command(flatten)]
        at: SpoolAt,
        /// From this time on (RFC 3339, or a UTC day YYYY-MM-DD).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only this outcome: recording, spooled, stored, failed, salvaged, refused.
        #[arg(long, value_name = "OUTCOME")]
        outcome: Option<String>,
        /// One JSON object (calls, refusals) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Everything the journal says of one recording, as JSON.
    Show {
        #[command(flatten)]
        at: SpoolAt,
        /// The recording id.
        id: String,
    },
}

/// What `edgerec identity` does.
#[cfg(feature = "appliance")]
#[derive(Debug, Subcommand)]
enum IdentityAction {
    /// Print the appliance id and its public key (SPKI PEM), to register where the store is
    /// verified. Reads the key file; never makes one.
    Show {
        /// The appliance's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// One JSON object (`appliance_id`, `public_key_pem`) instead.
        #[arg(long)]
        json: bool,
    },
}

/// What `edgerec lkm` does.
#[derive(Debug, Subcommand)]
enum LkmAction {
    /// Set up a key manager: a master key (if there is none; never replaced), the key store,
    /// and its first key pair. Prints the kek id.
    #[cfg(feature = "lkm")]
    Init {
        /// The key manager's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// The key manager's HTTPS service (the platform's key-manager contract), until SIGTERM.
    #[cfg(feature = "lkm")]
    Serve {
        /// The key manager's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Make a new key pair, the one recorders seal to from now on; older keys stay for
    /// decryption. Prints the kek id.
    #[cfg(feature = "lkm")]
    Rotate {
        /// The key manager's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Take an existing private key file into the key store (sealed; active, the current
    /// key until the next rotation): from key files to the key manager. Prints the kek id.
    #[cfg(feature = "lkm")]
    Import {
        /// The key manager's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The private key (PKCS#8 or PKCS#1 PEM).
        key: PathBuf,
    },
    /// Retire a key pair: no new recordings are sealed to it; it still decrypts.
    #[cfg(feature = "lkm")]
    Retire {
        /// The key manager's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The kek id (64 hex characters).
        kek_id: String,
    },
    /// Destroy a key pair's private key for good. First reads every package header in the
    /// store and shows how many recordings are sealed to it (and to it alone); refuses while
    /// any is sealed to it alone, or the store cannot be counted whole, unless --force. Asks
    /// for the kek id on a terminal; scripts pass --yes.
    #[cfg(feature = "lkm")]
    Destroy {
        /// The key manager's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// An appliance config whose [store] is the recording store to count in.
        #[arg(long, value_name = "FILE")]
        store_config: PathBuf,
        /// Destroy without asking (after the count is shown).
        #[arg(long)]
        yes: bool,
        /// Destroy even though recordings sealed to this key alone remain (they become
        /// unreadable for ever), or the store could not be counted whole.
        #[arg(long)]
        force: bool,
        /// Write the ids of the recordings sealed to this key alone to FILE, one a line.
        #[arg(long, value_name = "FILE")]
        list: Option<PathBuf>,
        /// The kek id (64 hex characters).
        kek_id: String,
    },
    /// The key pairs: id, state, creation time (the current one marked).
    #[cfg(feature = "lkm")]
    Keys {
        /// The key manager's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Hawk credentials for the key manager's clients.
    #[cfg(feature = "lkm")]
    Credentials {
        #[command(subcommand)]
        action: CredentialAction,
    },
    /// Write every key record, private keys still sealed, to FILE (0600).
    #[cfg(feature = "lkm")]
    Backup {
        /// The key manager's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Where the backup goes (never overwritten).
        out: PathBuf,
    },
    /// Restore a backup into the key store: its MAC is checked, every private key opened and
    /// matched to its id; nothing is overwritten and the current key does not change (unless
    /// the store had none). The master key (or KMS key) that sealed the backup must be the
    /// configured one.
    #[cfg(feature = "lkm")]
    Restore {
        /// The key manager's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Take an older backup without a MAC (made before edgerec signed backups): nothing
        /// shows whether it was changed.
        #[arg(long)]
        accept_unauthenticated: bool,
        /// Bring back only this destroyed key, from a backup made before its destruction; it
        /// comes back retired (it decrypts, it is never current).
        #[arg(long, value_name = "KEKID")]
        undestroy: Option<String>,
        /// The backup.
        backup: PathBuf,
    },
    /// Move the audit log aside (to FILE.<UTC time>, verified first) and start a new one whose
    /// first line names it, its line count and last hash. Stop the service first.
    #[cfg(feature = "lkm")]
    AuditArchive {
        /// The key manager's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check an audit log: its hash chain (every line there, in order, unchanged) and, with
    /// --config, every line's MAC under the key manager's audit key (lines removed and the
    /// hashes recomputed are found). Prints the number of lines and the last line's hash; keep
    /// that hash elsewhere, since lines cut off the end are found only against it. Exit
    /// status 4 names the first line that breaks the chain.
    VerifyAudit {
        /// The key manager's config file: check the MACs with its audit key.
        #[cfg(feature = "lkm")]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The audit log (JSON lines).
        file: PathBuf,
    },
}

/// What `edgerec lkm credentials` does.
#[cfg(feature = "lkm")]
#[derive(Debug, Subcommand)]
enum CredentialAction {
    /// Issue a credential: prints its id and key (base64) once, for the client's
    /// configuration.
    Add {
        /// The key manager's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// What it may do: recorder (public keys only: every recording appliance), decrypt
        /// (and unwrap: playback, open/export --lkm), platform (and make key pairs: the
        /// platform's contract client), admin (everything).
        #[arg(long, value_enum, default_value_t = RoleArg::Recorder)]
        role: RoleArg,
        /// The same as --role admin.
        #[arg(long, conflicts_with = "role")]
        admin: bool,
        /// The credential id (letters, digits, - _ .).
        id: String,
    },
    /// The credentials: ids and roles (never keys).
    List {
        /// The key manager's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change a credential's role: a running service applies it within 2 s.
    SetRole {
        /// The key manager's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The credential id.
        id: String,
        /// Its role from now on.
        #[arg(value_enum)]
        role: RoleArg,
    },
    /// Revoke a credential: a running service refuses it within 2 s.
    Remove {
        /// The key manager's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The credential id.
        id: String,
    },
}

/// The `--role` values.
#[cfg(feature = "lkm")]
#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    /// Public keys only: every recording appliance.
    Recorder,
    /// And unwraps: playback, `open` / `export --lkm`.
    Decrypt,
    /// And key pairs: the platform's contract client.
    Platform,
    /// Everything.
    Admin,
}

#[cfg(feature = "lkm")]
impl From<RoleArg> for edgerec_lkm::roles::Role {
    fn from(r: RoleArg) -> edgerec_lkm::roles::Role {
        match r {
            RoleArg::Recorder => edgerec_lkm::roles::Role::Recorder,
            RoleArg::Decrypt => edgerec_lkm::roles::Role::Decrypt,
            RoleArg::Platform => edgerec_lkm::roles::Role::Platform,
            RoleArg::Admin => edgerec_lkm::roles::Role::Admin,
        }
    }
}

/// Which spool.
#[cfg(feature = "appliance")]
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct SpoolAt {
    /// The appliance's config file (its recorder.spool_dir).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The spool directory itself.
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,
}

/// The `--wrap` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum WrapArg {
    /// RSA-OAEP-SHA256 with the EREC/dek label (wrap 1).
    OaepSha256,
    /// RSA-OAEP-SHA1, no label (wrap 2), for keys held by a contract LKM.
    OaepSha1,
}

impl From<WrapArg> for Wrap {
    fn from(w: WrapArg) -> Wrap {
        match w {
            WrapArg::OaepSha256 => Wrap::OaepSha256,
            WrapArg::OaepSha1 => Wrap::OaepSha1,
        }
    }
}

/// Runs the command line and returns the exit code.
pub fn main() -> ExitCode {
    // Data keys and private keys live in this process's memory: never in a core file, and
    // not readable by another process of the same user.
    if let Err(e) = crate::hardening::no_dumps() {
        eprintln!("edgerec: {e}");
        return ExitCode::from(1);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 2,
            });
        }
    };
    let result = match cli.command {
        Command::Man { dir } => man_pages(&dir),
        #[cfg(feature = "appliance")]
        Command::Run { config } => return appliance::run(&config),
        #[cfg(feature = "appliance")]
        Command::CheckConfig { config } => return appliance::check_config(&config),
        #[cfg(feature = "appliance")]
        Command::Loadgen {
            target,
            ports,
            streams,
            per_port,
            seconds,
            seed,
            replay,
        } => appliance::loadgen(
            &target,
            &ports,
            (streams, usize::from(per_port)),
            seconds,
            seed,
            replay.as_deref(),
        ),
        #[cfg(feature = "appliance")]
        Command::Spool { action } => match action {
            SpoolAction::List { at, json } => {
                spool::open(at.config.as_deref(), at.spool.as_deref())
                    .and_then(|s| spool::list(&s, json))
            }
            SpoolAction::Show { at, id } => spool::open(at.config.as_deref(), at.spool.as_deref())
                .and_then(|s| spool::show(&s, &id)),
            SpoolAction::Retry { at, all, ids } => {
                spool::open(at.config.as_deref(), at.spool.as_deref())
                    .and_then(|s| spool::retry(&s, &ids, all))
            }
        },
        #[cfg(feature = "appliance")]
        Command::Identity {
            action: IdentityAction::Show { config, json },
        } => appliance::identity_show(&config, json),
        #[cfg(feature = "appliance")]
        Command::Calls { action } => match action {
            CallsAction::List {
                at,
                since,
                outcome,
                json,
            } => calls::list(
                at.config.as_deref(),
                at.spool.as_deref(),
                since.as_deref(),
                outcome.as_deref(),
                json,
            ),
            CallsAction::Show { at, id } => {
                calls::show(at.config.as_deref(), at.spool.as_deref(), &id)
            }
        },
        Command::Lkm { action } => match action {
            #[cfg(feature = "lkm")]
            LkmAction::VerifyAudit { config, file } => lkm::verify_audit(config.as_deref(), &file),
            #[cfg(not(feature = "lkm"))]
            LkmAction::VerifyAudit { file } => verify_audit(&file),
            #[cfg(feature = "lkm")]
            LkmAction::Init { config } => lkm::init(&config),
            #[cfg(feature = "lkm")]
            LkmAction::AuditArchive { config } => lkm::audit_archive(&config),
            #[cfg(feature = "lkm")]
            LkmAction::Serve { config } => lkm::serve(&config),
            #[cfg(feature = "lkm")]
            LkmAction::Rotate { config } => lkm::rotate(&config),
            #[cfg(feature = "lkm")]
            LkmAction::Keys { config, json } => lkm::keys(&config, json),
            #[cfg(feature = "lkm")]
            LkmAction::Retire { config, kek_id } => lkm::retire(&config, &kek_id),
            #[cfg(feature = "lkm")]
            LkmAction::Import { config, key } => lkm::import(&config, &key),
            #[cfg(feature = "lkm")]
            LkmAction::Destroy {
                config,
                store_config,
                yes,
                force,
                list,
                kek_id,
            } => lkm::destroy(
                &config,
                lkm::DestroyArgs {
                    store_config: &store_config,
                    id: &kek_id,
                    yes,
                    force,
                    list: list.as_deref(),
                },
            ),
            #[cfg(feature = "lkm")]
            LkmAction::Credentials {
                action:
                    CredentialAction::Add {
                        config,
                        role,
                        admin,
                        id,
                    },
            } => lkm::add_credential(
                &config,
                &id,
                if admin {
                    edgerec_lkm::roles::Role::Admin
                } else {
                    role.into()
                },
            ),
            #[cfg(feature = "lkm")]
            LkmAction::Credentials {
                action: CredentialAction::List { config, json },
            } => lkm::list_credentials(&config, json),
            #[cfg(feature = "lkm")]
            LkmAction::Credentials {
                action: CredentialAction::SetRole { config, id, role },
            } => lkm::set_role(&config, &id, role.into()),
            #[cfg(feature = "lkm")]
            LkmAction::Credentials {
                action: CredentialAction::Remove { config, id },
            } => lkm::remove_credential(&config, &id),
            #[cfg(feature = "lkm")]
            LkmAction::Backup { config, out } => lkm::backup(&config, &out),
            #[cfg(feature = "lkm")]
            LkmAction::Restore {
                config,
                accept_unauthenticated,
                undestroy,
                backup,
            } => lkm::restore(
                &config,
                &backup,
                accept_unauthenticated,
                undestroy.as_deref(),
            ),
        },
        Command::Keygen { out, bits } => package::keygen(&out, bits.into()),
        Command::Seal {
            keks,
            wrap,
            chunk_size,
            threads,
            input,
            output,
        } => package::seal(&keks, wrap.into(), chunk_size, threads, &input, &output),
        Command::Open {
            keys,
            allow_unterminated,
            threads,
            input,
            output,
        } => keys
            .unwrapper()
            .and_then(|u| package::open(u.as_ref(), allow_unterminated, threads, &input, &output)),
        Command::Inspect { json, file } => package::inspect(&file, json),
        #[cfg(feature = "appliance")]
        Command::VerifyStore {
            keys,
            store_config,
            appliance_keys,
            from,
            to,
            json,
        } => keys.unwrapper().and_then(|u| {
            verify_store::verify_store(
                u.as_ref(),
                verify_store::VerifyArgs {
                    store_config: &store_config,
                    appliance_keys: &appliance_keys,
                    days: from.map(|f| (f, to)),
                    json,
                },
            )
        }),
        Command::Export {
            keys,
            out,
            #[cfg(feature = "appliance")]
            out_config,
            #[cfg(feature = "appliance")]
            sse,
            #[cfg(feature = "appliance")]
            sse_kms_key_id,
            #[cfg(feature = "appliance")]
            scratch,
            layout,
            org_id,
            format,
            inputs,
            #[cfg(feature = "appliance")]
            store_config,
            #[cfg(feature = "appliance")]
            from,
            #[cfg(feature = "appliance")]
            to,
            jobs,
            pgp_recipients,
            max_span_secs,
            no_join,
            media_types,
            #[cfg(feature = "appliance")]
            conversations,
            #[cfg(feature = "appliance")]
            conversations_file,
            #[cfg(feature = "appliance")]
            appliance_keys,
        } => keys.unwrapper().and_then(|u| {
            #[cfg(feature = "appliance")]
            let conversations =
                package::conversation_ids(conversations, conversations_file.as_deref())?;
            #[cfg(not(feature = "appliance"))]
            let conversations = Vec::new();
            package::export(
                u.as_ref(),
                package::ExportTo {
                    out,
                    #[cfg(feature = "appliance")]
                    out_config,
                    #[cfg(feature = "appliance")]
                    sse: match (sse, sse_kms_key_id) {
                        (None, _) => crate::export::bucket::Sse::None,
                        (Some(SseArg::S3), None) => crate::export::bucket::Sse::S3,
                        (Some(SseArg::S3), Some(_)) => {
                            return Err(crate::Error::Invalid(
                                "--sse-kms-key-id goes with --sse kms, not --sse s3".into(),
                            ));
                        }
                        (Some(SseArg::Kms), key) => crate::export::bucket::Sse::Kms(key),
                    },
                    #[cfg(feature = "appliance")]
                    scratch,
                    platform: layout == LayoutArg::Platform,
                    org_id,
                },
                format,
                package::ExportFrom {
                    inputs,
                    #[cfg(feature = "appliance")]
                    store_config,
                    #[cfg(feature = "appliance")]
                    days: from.map(|f| (f, to)),
                    pgp_recipients,
                    max_span: std::time::Duration::from_secs(max_span_secs),
                    media_types,
                    conversations,
                    join: !no_join,
                    #[cfg(feature = "appliance")]
                    appliance_keys,
                },
                jobs,
            )
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgerec: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `edgerec lkm verify-audit FILE` (a build without the key manager: the chain only).
#[cfg(not(feature = "lkm"))]
fn verify_audit(file: &std::path::Path) -> Result<(), crate::Error> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| crate::Error::Invalid(format!("{}: {e}", file.display())))?;
    let chain = edgerec_lkm::audit::verify(&text)?;
    println!(
        "{}: {} lines, chain intact; last hash {}",
        file.display(),
        chain.next_seq,
        hex::encode(chain.last_hash)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_visible_command_has_a_manual_page() {
        let dir = tempfile::tempdir().unwrap();
        super::man_pages(dir.path()).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for page in ["edgerec.1", "edgerec-export.1", "edgerec-open.1"] {
            assert!(names.iter().any(|n| n == page), "{page}: {names:?}");
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("-help") || n.contains("-man")),
            "{names:?}"
        );
        let export = std::fs::read_to_string(dir.path().join("edgerec-export.1")).unwrap();
        assert!(export.starts_with(".ie") || export.contains(".TH EDGEREC-EXPORT"));
        assert!(export.contains("out\\-config"), "the options are in it");
    }
}
