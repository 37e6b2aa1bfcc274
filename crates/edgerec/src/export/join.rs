//! Which packages make one call. A call is recorded in several packages when the appliance
//! restarts during it (the next process's recording on the port names the one it
//! continues) or reaches its maximum duration (the split names its predecessor): each part's
//! public metadata says `continues` with the recording id before it, readable without a key.
//! Export puts the parts back together by default; this module only decides the groups, from
//! the header facts (sans-IO).
//!
//! Rules: a call is a recording that continues none present, followed by those that
//! continue it, each continuing the one before; a part whose predecessor is not among the
//! packages starts a call of its own (its `continues` stays in its metadata); of two parts
//! that claim the same predecessor, the one made first continues it and the other starts its
//! own; a package listed twice, or one without readable facts, is a call of its own.

use std::collections::HashMap;

use uuid::Uuid;

/// What a package's header says about its place in a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// Its recording id.
    pub id: Uuid,
    /// The recording it continues, if it names one.
    pub continues: Option<Uuid>,
    /// When it was made (ms since the epoch).
    pub created_ms: u64,
}

impl Facts {
    /// The facts of a header's recording id, creation time and public metadata.
    pub fn of(recording_id: [u8; 16], created_ms: u64, public_metadata: &[u8]) -> Facts {
        let continues = erec::format::parse_json_object(public_metadata).and_then(|m| {
            m.get("continues")
                .and_then(serde_json::Value::as_str)
                .and_then(|s| Uuid::parse_str(s).ok())
        });
        Facts {
            id: Uuid::from_bytes(recording_id),
            continues,
            created_ms,
        }
    }
}

/// The calls among `packages` (by index), each in order from its first recording; calls in
/// the order of their first package's creation.
pub fn calls(packages: &[Option<Facts>]) -> Vec<Vec<usize>> {
    let mut by_id: HashMap<Uuid, usize> = HashMap::new();
    let mut listed_twice = vec![false; packages.len()];
    for (i, f) in packages.iter().enumerate() {
        if let Some(f) = f
            && by_id.insert(f.id, i).is_some()
        {
            listed_twice[i] = true;
            // The first listing keeps the id.
            let first = packages
                .iter()
                .position(|p| p.as_ref().is_some_and(|p| p.id == f.id))
                .expect("listed before");
            by_id.insert(f.id, first);
        }
    }
    // Each predecessor's successor: the earliest made of those that claim it.
    let mut next: HashMap<usize, usize> = HashMap::new();
    for (i, f) in packages.iter().enumerate() {
        let Some(f) = f else { continue };
        if listed_twice[i] {
            continue;
        }
        let Some(&p) = f.continues.and_then(|c| by_id.get(&c)) else {
            continue;
        };
        if p == i {
            continue;
        }
        let made = |j: usize| packages[j].map_or(u64::MAX, |f| f.created_ms);
        match next.get(&p) {
            Some(&other) if (made(other), other) <= (made(i), i) => {}
            _ => {
                next.insert(p, i);
            }
        }
    }
    let successor_of: HashMap<usize, usize> = next.iter().map(|(&p, &s)| (s, p)).collect();
    let mut seen = vec![false; packages.len()];
    let mut out = Vec::new();
    let mut heads: Vec<usize> = (0..packages.len())
        .filter(|i| !successor_of.contains_key(i))
        .collect();
    heads.sort_by_key(|&i| (packages[i].map_or(u64::MAX, |f| f.created_ms), i));
    for head in heads {
        let mut call = vec![head];
        seen[head] = true;
        let mut at = head;
        while let Some(&n) = next.get(&at) {
            if seen[n] {
                break;
            }
            seen[n] = true;
            call.push(n);
            at = n;
        }
        out.push(call);
    }
    // What only a cycle reaches (ids that name each other: not made by an appliance): each
    // on its own.
    out.extend((0..packages.len()).filter(|&i| !seen[i]).map(|i| vec![i]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(id: u128, continues: Option<u128>, created_ms: u64) -> Option<Facts> {
        Some(Facts {
            id: Uuid::from_u128(id),
            continues: continues.map(Uuid::from_u128),
            created_ms,
        })
    }

    #[test]
    fn parts_are_joined_in_order_whatever_order_they_are_listed_in() {
        let packages = [
            f(3, Some(2), 300),
            f(9, None, 50),
            f(1, None, 100),
            f(2, Some(1), 200),
        ];
        assert_eq!(calls(&packages), [vec![1], vec![2, 3, 0]]);
    }

    #[test]
    fn a_missing_predecessor_or_unreadable_facts_start_a_call_of_their_own() {
        let packages = [f(2, Some(1), 200), None, f(3, Some(2), 300)];
        assert_eq!(calls(&packages), [vec![0, 2], vec![1]]);
    }

    #[test]
    fn of_two_claims_the_first_made_continues_and_cycles_end() {
        let packages = [
            f(1, None, 100),
            f(3, Some(1), 250),
            f(2, Some(1), 200),
            f(7, Some(8), 700),
            f(8, Some(7), 800),
            f(1, None, 100),
        ];
        let got = calls(&packages);
        assert!(got.contains(&vec![0, 2]), "{got:?}");
        assert!(got.contains(&vec![1]), "{got:?}");
        assert!(got.contains(&vec![5]), "listed twice: {got:?}");
        let mut all: Vec<usize> = got.concat();
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2, 3, 4, 5], "every package in exactly one call");
    }

    #[test]
    fn continues_is_read_from_the_public_metadata() {
        let id = Uuid::from_u128(5);
        let meta = format!(r#"{{"port":40000,"continues":"{}"}}"#, id.hyphenated());
        assert_eq!(Facts::of([0; 16], 1, meta.as_bytes()).continues, Some(id));
        assert_eq!(Facts::of([0; 16], 1, br#"{"continues":7}"#).continues, None);
        assert_eq!(Facts::of([0; 16], 1, b"not json").continues, None);
    }
}
