//! `PROTOCOL.md` is the reference for implementers of other peers: its tag, opcode,
//! error-code and key-preference tables must list exactly the values and names this
//! crate puts on the wire, and its chain payload example must be what the codec writes.

use std::collections::{btree_set::Difference, BTreeSet};

use keyless_shared::{decode_chain, encode_chain, ErrorCode, KeyPreference, Opcode, Tag};

const DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/PROTOCOL.md"));

type Rows = BTreeSet<(u8, String)>;

/// The `(value, name)` rows of the table under the `## {heading}` heading.
fn table(heading: &str) -> Rows {
    table_under(&format!("## {heading}"))
}

/// The lines of the section under the heading line `wanted` (any level), up to the
/// next heading.
fn section<'a>(wanted: &'a str) -> impl Iterator<Item = &'static str> + 'a {
    let mut lines = DOC.lines().skip_while(move |l| l.trim_end() != wanted);
    assert!(
        lines.next().is_some(),
        "PROTOCOL.md has no `{wanted}` heading"
    );
    lines.take_while(|l| !l.starts_with('#'))
}

/// The `(value, name)` rows of the table under the heading line `wanted`.
fn table_under(wanted: &str) -> Rows {
    let table: Vec<&str> = section(wanted)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect();
    let [header, separator, body @ ..] = table.as_slice() else {
        panic!("no table under `{wanted}` in PROTOCOL.md");
    };
    assert_eq!(
        cells(header),
        ["value", "name", "meaning"],
        "header of the `{wanted}` table"
    );
    assert!(
        cells(separator).iter().all(|c| c.starts_with("---")),
        "separator row of the `{wanted}` table: {separator}"
    );

    let mut rows = Rows::new();
    for line in body {
        let [value, name, meaning] = cells(line)[..] else {
            panic!("`{wanted}` row does not have 3 cells: {line}");
        };
        let hex = value
            .strip_prefix("0x")
            .filter(|h| h.len() == 2)
            .unwrap_or_else(|| panic!("`{wanted}` value is not like 0x01: {line}"));
        let value = u8::from_str_radix(hex, 16)
            .unwrap_or_else(|e| panic!("`{wanted}` value is not hex ({e}): {line}"));
        assert!(!meaning.is_empty(), "`{wanted}` row has no meaning: {line}");
        assert!(
            rows.insert((value, name.to_owned())),
            "`{wanted}` row listed twice: {line}"
        );
    }
    rows
}

fn cells(line: &str) -> Vec<&str> {
    let inner = line
        .trim()
        .strip_prefix('|')
        .and_then(|l| l.strip_suffix('|'))
        .unwrap_or_else(|| panic!("table row does not start and end with `|`: {line}"));
    inner.split('|').map(str::trim).collect()
}

fn assert_same(heading: &str, doc: Rows, code: Rows) {
    let show = |rows: Difference<'_, (u8, String)>| {
        rows.map(|(v, n)| format!("0x{v:02X} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let missing = show(code.difference(&doc));
    let extra = show(doc.difference(&code));
    assert!(
        missing.is_empty() && extra.is_empty(),
        "PROTOCOL.md `## {heading}` is out of step with the code:\n  \
         in the code but not in the doc: [{missing}]\n  \
         in the doc but not in the code: [{extra}]"
    );
}

/// The `(value, name)` rows of the known values of a wire enum.
fn code_rows<T: Copy>(all: &[T], value: fn(T) -> u8, name: fn(T) -> &'static str) -> Rows {
    all.iter()
        .map(|&v| (value(v), name(v).to_owned()))
        .collect()
}

#[test]
fn tag_table_matches_enum() {
    let code = code_rows(Tag::ALL, Tag::to_u8, Tag::name);
    assert_same("Tags", table("Tags"), code);
}

#[test]
fn opcode_table_matches_enum() {
    let code = code_rows(Opcode::ALL, Opcode::to_u8, Opcode::name);
    assert_same("Opcodes", table("Opcodes"), code);
}

#[test]
fn error_code_table_matches_enum() {
    let code = code_rows(ErrorCode::ALL, ErrorCode::to_u8, ErrorCode::name);
    assert_same("Error codes", table("Error codes"), code);
}

#[test]
fn key_preference_table_matches_enum() {
    let code = code_rows(
        KeyPreference::ALL,
        KeyPreference::to_u8,
        KeyPreference::name,
    );
    assert_same("Key preferences", table_under("### Key preferences"), code);
}

#[test]
fn chain_payload_example_is_what_the_codec_writes() {
    let example = section("### Chain payload")
        .find(|l| l.starts_with("Example:"))
        .expect("no `Example:` line under `### Chain payload`");
    // `cert` `cert` ... `payload`, in hex (spaces in the payload only for reading).
    let mut quoted: Vec<Vec<u8>> = example
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|h| hex::decode(h.replace(' ', "")).expect("example is not hex"))
        .collect();
    let payload = quoted.pop().expect("example has no payload");
    assert!(!quoted.is_empty(), "example has no certificates: {example}");
    assert_eq!(
        encode_chain(&quoted).expect("example encodes"),
        payload,
        "{example}"
    );
    assert_eq!(
        decode_chain(&payload).expect("example decodes"),
        quoted.iter().map(Vec::as_slice).collect::<Vec<_>>(),
        "{example}"
    );
}

#[test]
fn extensions_are_marked() {
    for (heading, value) in [
        ("Tags", 0x40),
        ("Opcodes", 0x40),
        ("Error codes", 0x80),
        ("Error codes", 0x81),
        ("Error codes", 0x82),
    ] {
        let wanted = format!("## {heading}");
        let row = DOC
            .lines()
            .skip_while(|l| l.trim_end() != wanted)
            .find(|l| l.starts_with(&format!("| 0x{value:02X} |")))
            .unwrap_or_else(|| panic!("no 0x{value:02X} row under `{wanted}`"));
        assert!(
            row.contains("extension"),
            "0x{value:02X} under `{wanted}` is not marked as an extension: {row}"
        );
    }
}
