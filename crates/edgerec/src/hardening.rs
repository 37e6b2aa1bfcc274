//! What every edgerec process does first to keep the key material in its memory there: no
//! core file, and not dumpable (`PR_SET_DUMPABLE` = 0), so that neither a crash nor another
//! process of the same user (`ptrace`, `/proc/<pid>/mem`) reads a data key, a credential or
//! an opened private key out of it. Both services (`edgerec run`, `edgerec lkm serve`) and the
//! reading tools (`open`, `export`) go through [`no_dumps`].
//!
//! Invariant: a process that cannot make itself undumpable does not go on (the caller exits).

/// Sets the core file limit to 0 and the process undumpable.
pub fn no_dumps() -> std::io::Result<()> {
    rlimit::setrlimit(rlimit::Resource::CORE, 0, 0)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot disable core dumps: {e}")))?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| std::io::Error::other(format!("cannot make the process undumpable: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_is_left_undumpable_with_no_core_file() {
        super::no_dumps().unwrap();
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
        assert_eq!(rlimit::getrlimit(rlimit::Resource::CORE).unwrap(), (0, 0));
    }
}
