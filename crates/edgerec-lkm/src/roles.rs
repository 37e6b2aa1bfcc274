//! Who may do what in the key manager: the four roles a credential carries, and what each
//! endpoint needs. Pure: no I/O, no clock.
//!
//! The roles are ordered; each may do everything the ones below it may:
//!
//! | role | may |
//! |---|---|
//! | `recorder` | read public keys: `GET /current`, `GET /keypair`, `GET /keypair/{id}`, `OPTIONS` (what every recording appliance holds: it can encrypt, never decrypt) |
//! | `decrypt` | and `POST /decrypt`: unwrap data keys (playback, `edgerec open` / `export --lkm`) |
//! | `platform` | and `POST /keypair`: make key pairs (the platform's contract client) |
//! | `admin` | and `POST /auth`: issue credentials through the API |
//!
//! Invariant: an action not named here needs `admin` (unknown means the most privileged).

use serde::{Deserialize, Serialize};

/// A credential's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Public keys only: what every recording appliance holds.
    Recorder,
    /// And unwraps.
    Decrypt,
    /// And key pair creation: the platform's contract client.
    Platform,
    /// Everything, issuing credentials through the API included.
    Admin,
}

/// What a request asks of the key manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `GET /key-management/v1/current`.
    Current,
    /// `GET /key-management/v1/keypair`.
    ListKeypairs,
    /// `GET /key-management/v1/keypair/{id}`.
    GetKeypair,
    /// `OPTIONS /key-management/v1/decrypt`.
    DecryptOptions,
    /// `POST /key-management/v1/decrypt`.
    Decrypt,
    /// `POST /key-management/v1/keypair`.
    CreateKeypair,
    /// `POST /key-management/v1/auth`.
    IssueCredential,
    /// Anything else.
    Other,
}

impl Action {
    /// The action of a request line.
    pub fn of(method: &str, path: &str) -> Action {
        const P: &str = "/key-management/v1/";
        let Some(rest) = path.trim_end_matches('/').strip_prefix(P) else {
            return Action::Other;
        };
        match (method, rest) {
            ("GET", "current") => Action::Current,
            ("GET", "keypair") => Action::ListKeypairs,
            ("GET", r)
                if r.strip_prefix("keypair/")
                    .is_some_and(|id| !id.contains('/')) =>
            {
                Action::GetKeypair
            }
            ("OPTIONS", "decrypt") => Action::DecryptOptions,
            ("POST", "decrypt") => Action::Decrypt,
            ("POST", "keypair") => Action::CreateKeypair,
            ("POST", "auth") => Action::IssueCredential,
            _ => Action::Other,
        }
    }

    /// Its name in the audit log.
    pub fn name(self) -> &'static str {
        match self {
            Action::Current => "keypair.current",
            Action::ListKeypairs => "keypair.list",
            Action::GetKeypair => "keypair.get",
            Action::DecryptOptions => "decrypt.options",
            Action::Decrypt => "decrypt",
            Action::CreateKeypair => "keypair.create",
            Action::IssueCredential => "credentials.add",
            Action::Other => "other",
        }
    }

    /// The least role that may do it.
    pub fn needs(self) -> Role {
        match self {
            Action::Current
            | Action::ListKeypairs
            | Action::GetKeypair
            | Action::DecryptOptions => Role::Recorder,
            Action::Decrypt => Role::Decrypt,
            Action::CreateKeypair => Role::Platform,
            Action::IssueCredential | Action::Other => Role::Admin,
        }
    }
}

impl Role {
    /// Whether this role may do `action`.
    pub fn may(self, action: Action) -> bool {
        self >= action.needs()
    }

    /// The role's name, as written in the credentials file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Recorder => "recorder",
            Role::Decrypt => "decrypt",
            Role::Platform => "platform",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role's name that is none of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("role {0:?}: one of recorder, decrypt, platform, admin")]
pub struct UnknownRole(pub String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        match s {
            "recorder" => Ok(Role::Recorder),
            "decrypt" => Ok(Role::Decrypt),
            "platform" => Ok(Role::Platform),
            "admin" => Ok(Role::Admin),
            _ => Err(UnknownRole(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_may_do_what_the_contract_client_of_its_kind_needs_and_no_more() {
        use Action::*;
        let all = [
            Current,
            ListKeypairs,
            GetKeypair,
            DecryptOptions,
            Decrypt,
            CreateKeypair,
            IssueCredential,
            Other,
        ];
        let allowed = |r: Role| {
            all.iter()
                .filter(|a| r.may(**a))
                .copied()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            allowed(Role::Recorder),
            [Current, ListKeypairs, GetKeypair, DecryptOptions],
            "the edge only ever encrypts"
        );
        assert_eq!(
            allowed(Role::Decrypt),
            [Current, ListKeypairs, GetKeypair, DecryptOptions, Decrypt]
        );
        assert_eq!(
            allowed(Role::Platform),
            [
                Current,
                ListKeypairs,
                GetKeypair,
                DecryptOptions,
                Decrypt,
                CreateKeypair
            ]
        );
        assert_eq!(allowed(Role::Admin), all);
    }

    #[test]
    fn requests_map_onto_actions_by_method_and_exact_path() {
        let p = "/key-management/v1";
        assert_eq!(Action::of("GET", &format!("{p}/current")), Action::Current);
        assert_eq!(
            Action::of("GET", &format!("{p}/keypair/")),
            Action::ListKeypairs
        );
        assert_eq!(
            Action::of("GET", &format!("{p}/keypair/ab12")),
            Action::GetKeypair
        );
        assert_eq!(
            Action::of("GET", &format!("{p}/keypair/a/b")),
            Action::Other
        );
        assert_eq!(Action::of("POST", &format!("{p}/decrypt")), Action::Decrypt);
        assert_eq!(
            Action::of("OPTIONS", &format!("{p}/decrypt")),
            Action::DecryptOptions
        );
        assert_eq!(
            Action::of("POST", &format!("{p}/keypair")),
            Action::CreateKeypair
        );
        assert_eq!(
            Action::of("POST", &format!("{p}/auth")),
            Action::IssueCredential
        );
        assert_eq!(Action::of("DELETE", &format!("{p}/keypair")), Action::Other);
        assert_eq!(Action::of("GET", "/elsewhere/current"), Action::Other);
        assert_eq!(Action::Other.needs(), Role::Admin);
        assert_eq!("platform".parse::<Role>(), Ok(Role::Platform));
        assert!(
            "root"
                .parse::<Role>()
                .unwrap_err()
                .to_string()
                .contains("recorder, decrypt")
        );
        assert_eq!(
            serde_json::to_string(&Role::Decrypt).unwrap(),
            "\"decrypt\""
        );
    }
}
