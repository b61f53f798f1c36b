//! Looking for secrets where they must not be: in files and in a live process's memory.
//!
//! The invariant of the product is that no site private key is ever in an edge's files,
//! config, memory or logs. [`secret_needles`] turns a private key file into the byte
//! strings that would betray it (the PEM body, the DER, the private scalar or primes and
//! CRT values in both byte orders: big-endian as encoded, little-endian as bignum limbs
//! sit in memory on x86-64 and aarch64; and the Montgomery forms `ring` keeps a loaded
//! key in); [`scan_process_memory`] reads every readable mapping of a
//! process through `/proc/PID/mem` and reports where any needle occurs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use memchr::memmem;
use openssl::bn::{BigNum, BigNumContext, BigNumContextRef, BigNumRef};
use openssl::pkey::{Id, PKey};

/// Bytes read from `/proc/PID/mem` at a time.
const CHUNK: usize = 4 << 20;
/// Needles shorter than this could match by chance and prove nothing.
const MIN_NEEDLE: usize = 16;

/// A byte string to look for, with a name for reports.
#[derive(Clone)]
pub struct Needle {
    /// What the bytes are (`example.com-ecdsa.key: private scalar (big-endian)`).
    pub name: String,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Needle {
    // Never print the secret itself, even in a failing test's output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Needle({}, {} bytes)", self.name, self.bytes.len())
    }
}

impl Needle {
    /// A needle; fails if it is too short to mean anything.
    pub fn new(name: impl Into<String>, bytes: Vec<u8>) -> Result<Needle> {
        let name = name.into();
        if bytes.len() < MIN_NEEDLE {
            bail!(
                "needle {name} has {} bytes, fewer than {MIN_NEEDLE}",
                bytes.len()
            );
        }
        Ok(Needle { name, bytes })
    }
}

/// The byte strings that would show the private key in `key_path` (PEM, any of PKCS#8,
/// PKCS#1, SEC1): its PEM base64 body lines, its PKCS#8 DER, and for ECDSA the private
/// scalar, for RSA `p`, `q` and `d`, each big- and little-endian.
pub fn secret_needles(key_path: &Path) -> Result<Vec<Needle>> {
    let label = key_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| key_path.display().to_string());
    let pem = std::fs::read(key_path).with_context(|| format!("reading {}", key_path.display()))?;
    let key = PKey::private_key_from_pem(&pem)
        .with_context(|| format!("parsing {}", key_path.display()))?;
    let mut needles = Vec::new();

    // The base64 body: any full line of it in a file or in memory is a copy of the key.
    let text = String::from_utf8_lossy(&pem);
    for (i, line) in text
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= MIN_NEEDLE)
        .enumerate()
    {
        needles.push(Needle::new(
            format!("{label}: PEM line {}", i + 1),
            line.as_bytes().to_vec(),
        )?);
    }
    needles.push(Needle::new(
        format!("{label}: PKCS#8 DER"),
        key.private_key_to_pkcs8()?,
    )?);

    let mut numbers: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut ctx = BigNumContext::new()?;
    match key.id() {
        Id::EC => {
            let ec = key.ec_key()?;
            let mut order = BigNum::new()?;
            ec.group().order(&mut order, &mut ctx)?;
            let len = order.num_bytes();
            let d = ec.private_key();
            numbers.push(("private scalar", d.to_vec_padded(len)?));
            // ring keeps a loaded ECDSA key only as d·R mod n (Montgomery form).
            numbers.push((
                "private scalar in Montgomery form",
                montgomery(d, &order, &mut ctx)?.to_vec_padded(len)?,
            ));
        }
        Id::RSA => {
            let rsa = key.rsa()?;
            let missing = || anyhow::anyhow!("{}: RSA key without CRT values", label);
            let p = rsa.p().ok_or_else(missing)?;
            let q = rsa.q().ok_or_else(missing)?;
            numbers.push(("p", p.to_vec()));
            numbers.push(("q", q.to_vec()));
            numbers.push(("d", rsa.d().to_vec()));
            numbers.push(("d mod (p-1)", rsa.dmp1().ok_or_else(missing)?.to_vec()));
            numbers.push(("d mod (q-1)", rsa.dmq1().ok_or_else(missing)?.to_vec()));
            // ring keeps q⁻¹ mod p in Montgomery form.
            let iqmp = rsa.iqmp().ok_or_else(missing)?;
            numbers.push((
                "q^-1 mod p in Montgomery form",
                montgomery(iqmp, p, &mut ctx)?.to_vec_padded(p.num_bytes())?,
            ));
        }
        Id::ED25519 => {
            numbers.push(("seed", key.raw_private_key()?));
        }
        other => bail!("{}: unsupported key type {other:?}", key_path.display()),
    }
    for (what, big_endian) in numbers {
        let mut little_endian = big_endian.clone();
        little_endian.reverse();
        needles.push(Needle::new(
            format!("{label}: {what} (big-endian)"),
            big_endian,
        )?);
        needles.push(Needle::new(
            format!("{label}: {what} (little-endian)"),
            little_endian,
        )?);
    }
    Ok(needles)
}

/// `x·R mod m` with `R = 2^(64·limbs(m))`: how a Montgomery-arithmetic library (ring,
/// BoringSSL, OpenSSL) holds `x` between operations on 64-bit machines.
fn montgomery(x: &BigNumRef, m: &BigNumRef, ctx: &mut BigNumContextRef) -> Result<BigNum> {
    // num_bits is positive for a modulus; (bits + 63) / 64 rounds up to whole limbs.
    let limbs = (m.num_bits() + 63) / 64;
    let one = BigNum::from_u32(1)?;
    let mut r = BigNum::new()?;
    r.lshift(&one, limbs * 64)?;
    let mut out = BigNum::new()?;
    out.mod_mul(x, &r, m, ctx)?;
    Ok(out)
}

/// Where needles were found in `haystack` (a file, a log): the names of those found.
pub fn find_in_bytes(haystack: &[u8], needles: &[Needle]) -> Vec<String> {
    needles
        .iter()
        .filter(|n| memmem::find(haystack, &n.bytes).is_some())
        .map(|n| n.name.clone())
        .collect()
}

/// One hit in a process's memory.
#[derive(Clone, Debug)]
pub struct MemoryHit {
    /// The needle's name.
    pub needle: String,
    /// The virtual address.
    pub address: u64,
    /// The mapping's line in `/proc/PID/maps`.
    pub mapping: String,
}

/// What a memory scan covered and found.
#[derive(Clone, Debug, Default)]
pub struct MemoryScan {
    /// Readable mappings read.
    pub regions: usize,
    /// Readable mappings the kernel refused to read (e.g. `[vvar]`).
    pub unreadable: usize,
    /// Bytes searched.
    pub bytes: u64,
    /// Every needle occurrence (at most one per needle and mapping).
    pub hits: Vec<MemoryHit>,
}

impl MemoryScan {
    /// Whether the needle named `name` was found.
    pub fn found(&self, name: &str) -> bool {
        self.hits.iter().any(|h| h.needle == name)
    }
}

/// Bytes per anchor word.
const WORD: usize = 8;

/// Every 8-byte window a needle could show at an 8-aligned address: for each needle and
/// each offset `k < 8`, the word `needle[k..k + 8]`, sorted for binary search.
///
/// An occurrence of a needle (at least 15 bytes long) at any address `s` covers the
/// aligned address `g` in `s..s + 8`, and the word at `g` is `needle[g - s..][..8]`. So
/// looking up only the aligned words of memory finds every occurrence, at an eighth of
/// the lookups of a byte-by-byte scan, for all needles in one pass — fast enough even
/// in an unoptimised test build, where a `memmem` pass per needle is not.
struct AnchorIndex<'a> {
    needles: &'a [Needle],
    /// (word, needle index, offset of the word in the needle).
    anchors: Vec<(u64, usize, usize)>,
}

impl<'a> AnchorIndex<'a> {
    fn new(needles: &'a [Needle]) -> AnchorIndex<'a> {
        let mut anchors = Vec::new();
        for (i, needle) in needles.iter().enumerate() {
            for k in 0..WORD {
                if let Some(word) = needle.bytes.get(k..k + WORD) {
                    anchors.push((word_at(word), i, k));
                }
            }
        }
        anchors.sort_unstable();
        AnchorIndex { needles, anchors }
    }

    /// Calls `hit(needle index, offset in data)` for each needle occurrence in `data`
    /// that lies wholly inside it. `data[0]` must be at an 8-aligned address.
    fn search(&self, data: &[u8], mut hit: impl FnMut(usize, usize)) {
        for (w, chunk) in data.chunks_exact(WORD).enumerate() {
            let word = word_at(chunk);
            let first = self.anchors.partition_point(|a| a.0 < word);
            for &(_, i, k) in self.anchors.iter().skip(first).take_while(|a| a.0 == word) {
                let Some(start) = (w * WORD).checked_sub(k) else {
                    continue;
                };
                let Some(needle) = self.needles.get(i) else {
                    continue;
                };
                if data.get(start..start + needle.bytes.len()) == Some(needle.bytes.as_slice()) {
                    hit(i, start);
                }
            }
        }
    }
}

fn word_at(bytes: &[u8]) -> u64 {
    let mut word = [0u8; WORD];
    word.copy_from_slice(bytes.get(..WORD).unwrap_or(&[0; WORD]));
    u64::from_le_bytes(word)
}

/// Reads every readable mapping of process `pid` and searches it for the needles.
///
/// Reading another process's memory needs ptrace access to it: being root, or being its
/// parent (as the tests are of the processes they spawn) with the same uid.
pub fn scan_process_memory(pid: u32, needles: &[Needle]) -> Result<MemoryScan> {
    if let Some(short) = needles.iter().find(|n| n.bytes.len() < MIN_NEEDLE) {
        bail!("needle {} is shorter than {MIN_NEEDLE} bytes", short.name);
    }
    let maps_path = format!("/proc/{pid}/maps");
    let maps =
        std::fs::read_to_string(&maps_path).with_context(|| format!("reading {maps_path}"))?;
    let mem_path = format!("/proc/{pid}/mem");
    let mem = File::open(&mem_path).with_context(|| format!("opening {mem_path}"))?;
    let index = AnchorIndex::new(needles);
    // Carried from one chunk to the next so an occurrence across the boundary is whole
    // in the next one; a multiple of the word size keeps chunk starts aligned.
    let longest = needles.iter().map(|n| n.bytes.len()).max().unwrap_or(0);
    let overlap = (longest + WORD).next_multiple_of(WORD);

    let mut scan = MemoryScan::default();
    let mut buf = vec![0u8; CHUNK + overlap];
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let mut found_here = vec![false; needles.len()];
        // Mappings are page-aligned, and so (with CHUNK and `overlap` multiples of 8)
        // is every chunk's first byte.
        let mut addr = start;
        let mut carried = 0usize;
        let mut readable = true;
        while addr < end {
            let want = usize::try_from(end - addr).unwrap_or(CHUNK).min(CHUNK);
            let Some(window) = buf.get_mut(carried..carried + want) else {
                break;
            };
            let got = match mem.read_at(window, addr) {
                Ok(0) | Err(_) => {
                    readable = addr > start;
                    break;
                }
                Ok(n) => n,
            };
            let base = addr - carried as u64;
            let data = buf.get(..carried + got).unwrap_or_default();
            index.search(data, |i, offset| {
                if let (Some(found), Some(needle)) = (found_here.get_mut(i), needles.get(i)) {
                    if !*found {
                        *found = true;
                        scan.hits.push(MemoryHit {
                            needle: needle.name.clone(),
                            address: base + offset as u64,
                            mapping: line.to_owned(),
                        });
                    }
                }
            });
            scan.bytes += got as u64;
            addr += got as u64;
            let keep = overlap.min(carried + got) / WORD * WORD;
            buf.copy_within(carried + got - keep..carried + got, 0);
            carried = keep;
        }
        if readable {
            scan.regions += 1;
        } else {
            scan.unreadable += 1;
        }
    }
    if scan.regions == 0 {
        bail!("no readable mapping in {maps_path}: is ptrace access to {pid} denied?");
    }
    Ok(scan)
}
