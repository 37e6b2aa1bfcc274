//! RFC 7865 recording metadata: who is on the call, which streams are whose, the session and
//! group ids; parsed as recording clients really write it, and merged as updates come.
//!
//! Read by local name in any namespace (`urn:ietf:params:xml:ns:recording:1`, Oracle's and
//! Ribbon's without `:1`, BroadWorks' `…:siprec` with root `recording_metadata`), element
//! names without case (Intrado's `dataMode`), ids from `*_id` attributes or plain `id`
//! (Oracle), a participant's streams from `participantstreamassoc` or from `<send>`/`<recv>`
//! inside the participant (Oracle); nothing is required that RFC 7865 does not require.
//!
//! Invariants: no DOCTYPE (so no entity is ever expanded: roxmltree refuses a DTD unless
//! told otherwise), at most [`MAX_XML`] bytes and [`MAX_NODES`] nodes parsed, at most
//! [`MAX_ITEMS`] sessions, participants and streams kept (also across updates), every kept
//! text at most [`MAX_TEXT`] bytes. Pure: no I/O.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// The largest metadata document parsed (the whole SIP message is bounded too).
pub const MAX_XML: usize = 64 * 1024;
/// The most XML nodes parsed.
pub const MAX_NODES: u32 = 20_000;
/// The most sessions, participants and streams kept, each.
pub const MAX_ITEMS: usize = 64;
/// The longest text kept (an id, an AOR, a name, a time); longer ones are cut.
pub const MAX_TEXT: usize = 256;

/// A recording session's metadata, as far as the client has told it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// `complete` or `partial`, as the last document said (`None`: not said, read as
    /// complete).
    pub datamode: Option<String>,
    /// The group id.
    pub group_id: Option<String>,
    /// Communication sessions by id.
    pub sessions: BTreeMap<String, Session>,
    /// Participants by id.
    pub participants: BTreeMap<String, Participant>,
    /// Streams by id.
    pub streams: BTreeMap<String, Stream>,
}

/// A communication session (the call recorded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// Its SIP session ids.
    pub sip_session_ids: Vec<String>,
    /// When it started, as the client wrote it.
    pub start_time: Option<String>,
    /// When it stopped.
    pub stop_time: Option<String>,
}

/// A participant of the call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Participant {
    /// Its address of record (often without `sip:`).
    pub aor: Option<String>,
    /// Its display name.
    pub name: Option<String>,
    /// The ids of the streams it sends on.
    pub send: Vec<String>,
    /// The ids of the streams it receives.
    pub recv: Vec<String>,
}

/// A media stream of the recording.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stream {
    /// The communication session it belongs to.
    pub session: Option<String>,
    /// Its label: the `a=label` of its m-line in the SDP.
    pub label: Option<String>,
}

/// Why a metadata document was refused.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// Larger than [`MAX_XML`].
    #[error("metadata of {0} bytes (at most {MAX_XML})")]
    TooLarge(usize),
    /// Not UTF-8.
    #[error("metadata is not UTF-8")]
    NotUtf8,
    /// Not well-formed XML, or with a DOCTYPE, or too many nodes.
    #[error("metadata XML: {0}")]
    Xml(#[from] roxmltree::Error),
    /// The root is not `recording` (or BroadWorks' `recording_metadata`).
    #[error("metadata root <{0}> is not <recording>")]
    NotRecording(String),
}

/// Parses one metadata document.
pub fn parse(xml: &[u8]) -> Result<Metadata, MetadataError> {
    if xml.len() > MAX_XML {
        return Err(MetadataError::TooLarge(xml.len()));
    }
    let text = std::str::from_utf8(xml).map_err(|_| MetadataError::NotUtf8)?;
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_NODES,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(text, options)?;
    let root = doc.root_element();
    let root_name = root.tag_name().name();
    if !(root_name.eq_ignore_ascii_case("recording")
        || root_name.eq_ignore_ascii_case("recording_metadata"))
    {
        return Err(MetadataError::NotRecording(cut(root_name)));
    }
    let mut m = Metadata::default();
    for e in root.children().filter(roxmltree::Node::is_element) {
        match local(&e).as_str() {
            "datamode" => m.datamode = text_of(&e),
            "group" => m.group_id = m.group_id.or(id_of(&e, "group_id")),
            "session" => {
                let Some(id) = id_of(&e, "session_id") else {
                    continue;
                };
                let mut s = Session::default();
                for c in e.children().filter(roxmltree::Node::is_element) {
                    match local(&c).as_str() {
                        "sipsessionid" => s.sip_session_ids.extend(text_of(&c)),
                        "start-time" => s.start_time = text_of(&c),
                        "stop-time" => s.stop_time = text_of(&c),
                        _ => {}
                    }
                }
                s.sip_session_ids.truncate(MAX_ITEMS);
                insert(&mut m.sessions, id, s);
            }
            "participant" => {
                let Some(id) = id_of(&e, "participant_id") else {
                    continue;
                };
                let mut p = Participant::default();
                for c in e.children().filter(roxmltree::Node::is_element) {
                    match local(&c).as_str() {
                        "nameid" => {
                            p.aor = p.aor.or(attr(&c, "aor"));
                            p.name = p.name.or(c
                                .children()
                                .find(|n| n.is_element() && local(n) == "name")
                                .and_then(|n| text_of(&n)));
                        }
                        "aor" => p.aor = p.aor.or(text_of(&c)),
                        "name" => p.name = p.name.or(text_of(&c)),
                        "send" => p.send.extend(text_of(&c)),
                        "recv" => p.recv.extend(text_of(&c)),
                        _ => {}
                    }
                }
                bound(&mut p);
                insert(&mut m.participants, id, p);
            }
            "stream" => {
                let Some(id) = id_of(&e, "stream_id") else {
                    continue;
                };
                let session = attr(&e, "session_id").or_else(|| attr(&e, "session"));
                let label = e
                    .children()
                    .find(|n| n.is_element() && local(n) == "label")
                    .and_then(|n| text_of(&n));
                insert(&mut m.streams, id, Stream { session, label });
            }
            "participantstreamassoc" => {
                let Some(id) = id_of(&e, "participant_id") else {
                    continue;
                };
                let mut a = Participant::default();
                for c in e.children().filter(roxmltree::Node::is_element) {
                    match local(&c).as_str() {
                        "send" => a.send.extend(text_of(&c)),
                        "recv" => a.recv.extend(text_of(&c)),
                        _ => {}
                    }
                }
                bound(&mut a);
                // An association for a participant not (yet) described still says who sends.
                match m.participants.get_mut(&id) {
                    Some(p) => {
                        p.send.extend(a.send);
                        p.recv.extend(a.recv);
                        bound(p);
                    }
                    None => insert(&mut m.participants, id, a),
                }
            }
            _ => {}
        }
    }
    Ok(m)
}

impl Metadata {
    /// Whether the last document said it holds only changes.
    pub fn is_partial(&self) -> bool {
        self.datamode
            .as_deref()
            .is_some_and(|d| d.eq_ignore_ascii_case("partial"))
    }

    /// The metadata after `update`: a complete document replaces it, a partial one changes
    /// what it names (an element named again is replaced, field by field where it says
    /// something) and keeps the rest.
    pub fn apply(&mut self, update: Metadata) {
        if !update.is_partial() {
            *self = update;
            return;
        }
        self.datamode = update.datamode;
        if update.group_id.is_some() {
            self.group_id = update.group_id;
        }
        for (id, s) in update.sessions {
            match self.sessions.get_mut(&id) {
                Some(old) => {
                    if !s.sip_session_ids.is_empty() {
                        old.sip_session_ids = s.sip_session_ids;
                    }
                    old.start_time = s.start_time.or(old.start_time.take());
                    old.stop_time = s.stop_time.or(old.stop_time.take());
                }
                None => insert(&mut self.sessions, id, s),
            }
        }
        for (id, p) in update.participants {
            match self.participants.get_mut(&id) {
                Some(old) => {
                    old.aor = p.aor.or(old.aor.take());
                    old.name = p.name.or(old.name.take());
                    if !p.send.is_empty() {
                        old.send = p.send;
                    }
                    if !p.recv.is_empty() {
                        old.recv = p.recv;
                    }
                }
                None => insert(&mut self.participants, id, p),
            }
        }
        for (id, s) in update.streams {
            match self.streams.get_mut(&id) {
                Some(old) => {
                    old.session = s.session.or(old.session.take());
                    old.label = s.label.or(old.label.take());
                }
                None => insert(&mut self.streams, id, s),
            }
        }
    }

    /// The label of stream `id`, if the metadata gives one.
    pub fn label_of(&self, id: &str) -> Option<&str> {
        self.streams.get(id).and_then(|s| s.label.as_deref())
    }

    /// The participants that send on the stream labelled `label`.
    pub fn senders_of(&self, label: &str) -> Vec<&str> {
        self.participants
            .iter()
            .filter(|(_, p)| p.send.iter().any(|s| self.label_of(s) == Some(label)))
            .map(|(id, _)| id.as_str())
            .collect()
    }

    /// The metadata as the recording's JSON: sessions, participants (with the labels of the
    /// streams each sends and receives) and streams, each a list with its id.
    pub fn to_json(&self) -> Value {
        let labels = |ids: &[String]| -> Vec<Value> {
            ids.iter()
                .map(|s| json!({ "stream_id": s, "label": self.label_of(s) }))
                .collect()
        };
        json!({
            "group_id": self.group_id,
            "sessions": self.sessions.iter().map(|(id, s)| json!({
                "session_id": id,
                "sip_session_ids": s.sip_session_ids,
                "start_time": s.start_time,
                "stop_time": s.stop_time,
            })).collect::<Vec<_>>(),
            "participants": self.participants.iter().map(|(id, p)| json!({
                "participant_id": id,
                "aor": p.aor,
                "name": p.name,
                "send": labels(&p.send),
                "recv": labels(&p.recv),
            })).collect::<Vec<_>>(),
            "streams": self.streams.iter().map(|(id, s)| json!({
                "stream_id": id,
                "session_id": s.session,
                "label": s.label,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Inserts unless the map is full (or replaces an entry of the same id).
fn insert<V>(map: &mut BTreeMap<String, V>, id: String, v: V) {
    if map.len() < MAX_ITEMS || map.contains_key(&id) {
        map.insert(id, v);
    }
}

/// A participant's stream lists without repeats (a stream named twice would be listed, and
/// its label copied into the JSON, twice), at most [`MAX_ITEMS`] each.
fn bound(p: &mut Participant) {
    for list in [&mut p.send, &mut p.recv] {
        let mut seen = std::collections::HashSet::new();
        list.retain(|s| seen.insert(s.clone()));
        list.truncate(MAX_ITEMS);
    }
}

/// An element's local name, lower-cased.
fn local(n: &roxmltree::Node<'_, '_>) -> String {
    n.tag_name().name().to_ascii_lowercase()
}

/// An element's id: attribute `name` (RFC 7865) or `id` (Oracle).
fn id_of(n: &roxmltree::Node<'_, '_>, name: &str) -> Option<String> {
    attr(n, name).or_else(|| attr(n, "id"))
}

fn attr(n: &roxmltree::Node<'_, '_>, name: &str) -> Option<String> {
    n.attributes()
        .find(|a| a.name().eq_ignore_ascii_case(name))
        .map(|a| cut(a.value().trim()))
        .filter(|v| !v.is_empty())
}

/// An element's text, trimmed and cut; `None` when empty.
fn text_of(n: &roxmltree::Node<'_, '_>) -> Option<String> {
    let t: String = n
        .children()
        .filter(roxmltree::Node::is_text)
        .filter_map(|t| t.text())
        .collect();
    Some(cut(t.trim())).filter(|t| !t.is_empty())
}

/// `s` cut to at most [`MAX_TEXT`] bytes at a character boundary.
fn cut(s: &str) -> String {
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7865's example shape: two participants, two streams, associations.
    const RFC: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns='urn:ietf:params:xml:ns:recording:1'>
  <datamode>complete</datamode>
  <group group_id="7+OTCyoxTmqmqyA/1weDAg==">
    <associate-time>2010-12-16T23:41:07Z</associate-time>
  </group>
  <session session_id="hVpd7YQgRW2nD22h7q60JQ==">
    <sipSessionID>ab30317f1a784dc48ff824d0d3715d86;remote=47755a9de7794ba387653f2099600ef2</sipSessionID>
    <group-ref>7+OTCyoxTmqmqyA/1weDAg==</group-ref>
    <start-time>2010-12-16T23:41:07Z</start-time>
  </session>
  <participant participant_id="srfBElmCRp2QB23b7Mpk0w==">
    <nameID aor="sip:bob@biloxi.com"><name xml:lang="it">Bob</name></nameID>
  </participant>
  <participant participant_id="zSfPoSvdSDCmU3A3TRDxAw==">
    <nameID aor="sip:alice@atlanta.com"><name xml:lang="it">Alice</name></nameID>
  </participant>
  <stream stream_id="UAAMm5GRQKSCMVvLyl4rFw==" session_id="hVpd7YQgRW2nD22h7q60JQ==">
    <label>96</label>
  </stream>
  <stream stream_id="i1Pz3to5hGk8fuXl+PbwCw==" session_id="hVpd7YQgRW2nD22h7q60JQ==">
    <label>97</label>
  </stream>
  <sessionrecordingassoc session_id="hVpd7YQgRW2nD22h7q60JQ=="/>
  <participantsessionassoc participant_id="srfBElmCRp2QB23b7Mpk0w==" session_id="hVpd7YQgRW2nD22h7q60JQ=="/>
  <participantstreamassoc participant_id="srfBElmCRp2QB23b7Mpk0w==">
    <send>i1Pz3to5hGk8fuXl+PbwCw==</send>
    <recv>UAAMm5GRQKSCMVvLyl4rFw==</recv>
  </participantstreamassoc>
  <participantstreamassoc participant_id="zSfPoSvdSDCmU3A3TRDxAw==">
    <send>UAAMm5GRQKSCMVvLyl4rFw==</send>
    <recv>i1Pz3to5hGk8fuXl+PbwCw==</recv>
  </participantstreamassoc>
</recording>"#;

    #[test]
    fn the_rfc_form_gives_participants_streams_and_who_sends_where() {
        let m = parse(RFC.as_bytes()).unwrap();
        assert_eq!(m.group_id.as_deref(), Some("7+OTCyoxTmqmqyA/1weDAg=="));
        assert_eq!(m.participants.len(), 2);
        let alice = &m.participants["zSfPoSvdSDCmU3A3TRDxAw=="];
        assert_eq!(alice.aor.as_deref(), Some("sip:alice@atlanta.com"));
        assert_eq!(alice.name.as_deref(), Some("Alice"));
        assert_eq!(m.senders_of("96"), ["zSfPoSvdSDCmU3A3TRDxAw=="]);
        assert_eq!(m.senders_of("97"), ["srfBElmCRp2QB23b7Mpk0w=="]);
        let s = &m.sessions["hVpd7YQgRW2nD22h7q60JQ=="];
        assert_eq!(s.start_time.as_deref(), Some("2010-12-16T23:41:07Z"));
        assert_eq!(s.sip_session_ids.len(), 1);
        let j = m.to_json();
        assert_eq!(j["participants"][1]["send"][0]["label"], "96");
    }

    #[test]
    fn oracle_style_ids_and_sends_inside_the_participant() {
        // Oracle/Acme (and Avaya behind it): namespace without :1, id/session attributes,
        // <send> inside <participant>, apkt: extensions, AORs without sip:.
        let xml = r#"<?xml version='1.0' encoding='UTF-8'?>
<recording xmlns='urn:ietf:params:xml:ns:recording' xmlns:apkt='http://acmepacket.com/siprec/extensiondata'>
  <datamode>complete</datamode>
  <session id="0PMPBCoiRyJKuGmVhHS0Mg=="><start-time>2015-03-02T14:55:17</start-time></session>
  <participant id="8OujUFK5TlV9Fv0dDRnl9g==" session="0PMPBCoiRyJKuGmVhHS0Mg==">
    <nameID aor="2001@10.1.2.3"><name>Caller</name></nameID>
    <send>Uzcv4E3MQWV3XFqAgKPXvw==</send>
    <apkt:callingParty>true</apkt:callingParty>
  </participant>
  <stream id="Uzcv4E3MQWV3XFqAgKPXvw==" session="0PMPBCoiRyJKuGmVhHS0Mg==">
    <label>16777227</label><mode>separate</mode>
  </stream>
  <apkt:ucid>00FA080018803B69810C2C;encoding=hex</apkt:ucid>
</recording>"#;
        let m = parse(xml.as_bytes()).unwrap();
        let p = &m.participants["8OujUFK5TlV9Fv0dDRnl9g=="];
        assert_eq!(p.aor.as_deref(), Some("2001@10.1.2.3"));
        assert_eq!(m.senders_of("16777227"), ["8OujUFK5TlV9Fv0dDRnl9g=="]);
        assert_eq!(
            m.streams["Uzcv4E3MQWV3XFqAgKPXvw=="].session.as_deref(),
            Some("0PMPBCoiRyJKuGmVhHS0Mg==")
        );
    }

    #[test]
    fn broadworks_ribbon_and_intrado_spellings() {
        // BroadWorks: root recording_metadata, namespace …:siprec; Ribbon: a tns: prefix;
        // Intrado: dataMode in camel case; OpenSIPS: no participantstreamassoc at all.
        let bw = r#"<recording_metadata xmlns="urn:ietf:params:xml:ns:siprec"><dataMode>partial</dataMode>
<participant participant_id="p1"><nameID aor="sip:+15551234@bw.example"/></participant></recording_metadata>"#;
        let m = parse(bw.as_bytes()).unwrap();
        assert!(m.is_partial());
        assert_eq!(
            m.participants["p1"].aor.as_deref(),
            Some("sip:+15551234@bw.example")
        );
        let ribbon = r#"<tns:recording xmlns:tns="urn:ietf:params:xml:ns:recording">
<tns:datamode>complete</tns:datamode>
<tns:stream stream_id="s1" session_id="x"><tns:label>1</tns:label></tns:stream>
<tns:participant participant_id="a"><tns:nameID aor="alice@example.com"/></tns:participant>
</tns:recording>"#;
        let m = parse(ribbon.as_bytes()).unwrap();
        assert_eq!(m.label_of("s1"), Some("1"));
        assert!(m.senders_of("1").is_empty(), "nobody said who sends");
    }

    #[test]
    fn partial_updates_change_what_they_name_and_complete_ones_replace() {
        let mut m = parse(RFC.as_bytes()).unwrap();
        let update = r#"<recording xmlns="urn:ietf:params:xml:ns:recording:1"><datamode>partial</datamode>
<session session_id="hVpd7YQgRW2nD22h7q60JQ=="><stop-time>2010-12-16T23:45:00Z</stop-time></session>
<participant participant_id="new"><nameID aor="sip:carol@example.com"><name>Carol</name></nameID></participant>
</recording>"#;
        m.apply(parse(update.as_bytes()).unwrap());
        let s = &m.sessions["hVpd7YQgRW2nD22h7q60JQ=="];
        assert_eq!(
            s.start_time.as_deref(),
            Some("2010-12-16T23:41:07Z"),
            "kept"
        );
        assert_eq!(s.stop_time.as_deref(), Some("2010-12-16T23:45:00Z"));
        assert_eq!(m.participants.len(), 3);
        assert_eq!(m.senders_of("96"), ["zSfPoSvdSDCmU3A3TRDxAw=="], "kept");
        let complete = r#"<recording xmlns="urn:ietf:params:xml:ns:recording:1">
<participant participant_id="only"/></recording>"#;
        m.apply(parse(complete.as_bytes()).unwrap());
        assert_eq!(m.participants.keys().collect::<Vec<_>>(), ["only"]);
        assert!(m.streams.is_empty());
    }

    #[test]
    fn entities_doctypes_and_floods_are_refused_or_bounded() {
        let bomb = r#"<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>
<recording><participant participant_id="&b;"/></recording>"#;
        assert!(matches!(
            parse(bomb.as_bytes()),
            Err(MetadataError::Xml(roxmltree::Error::DtdDetected))
        ));
        let external = r#"<!DOCTYPE recording SYSTEM "file:///etc/passwd"><recording/>"#;
        assert!(parse(external.as_bytes()).is_err());
        assert!(matches!(
            parse(&vec![b' '; MAX_XML + 1]),
            Err(MetadataError::TooLarge(_))
        ));
        assert!(matches!(
            parse(b"<html/>"),
            Err(MetadataError::NotRecording(_))
        ));
        assert!(matches!(parse(b"\xff\xfe"), Err(MetadataError::NotUtf8)));
        // A flood of participants keeps MAX_ITEMS; long texts are cut.
        let many: String = (0..100)
            .map(|i| {
                format!(
                    "<participant participant_id=\"p{i}\"><nameID aor=\"{}\"/></participant>",
                    "x".repeat(300)
                )
            })
            .collect();
        let m = parse(format!("<recording>{many}</recording>").as_bytes()).unwrap();
        assert_eq!(m.participants.len(), MAX_ITEMS);
        assert!(
            m.participants
                .values()
                .all(|p| p.aor.as_ref().unwrap().len() == MAX_TEXT)
        );
        // Within the size bound, more nodes than MAX_NODES (an element and a text each).
        let nodes = "<a/>x".repeat(12_000);
        assert!(matches!(
            parse(format!("<recording>{nodes}</recording>").as_bytes()),
            Err(MetadataError::Xml(roxmltree::Error::NodesLimitReached))
        ));
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_errs_without_panic(s in "(<[a-z:_]{1,8}( [a-z_]{1,6}=\"[^\"<&]{0,6}\")?>|</[a-z:_]{1,8}>|[^<&]{0,8}){0,40}") {
            let _ = parse(format!("<recording>{s}</recording>").as_bytes());
        }
    }
}
