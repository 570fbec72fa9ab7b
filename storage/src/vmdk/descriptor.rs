//! The VMDK text descriptor: `key=value` lines, extent lines and `ddb.*` entries. Every line is
//! kept as written so a rewrite (a new CID) changes only the lines it must.

use std::path::Path;

use crate::error::{Result, StorageError};

/// The most a descriptor may hold; real ones are a few hundred bytes.
pub const MAX_DESCRIPTOR: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Rw,
    RdOnly,
    NoAccess,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    Sparse,
    Flat,
    Zero,
    Vmfs,
    VmfsSparse,
    SeSparse,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    pub access: Access,
    pub sectors: u64,
    pub kind: ExtentType,
    pub file: Option<String>,
    /// Start of the extent's data in its file, in sectors (FLAT).
    pub offset: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Descriptor {
    pub lines: Vec<String>,
    pub extents: Vec<ExtentLine>,
}

/// Splits `key = "value"` (quotes and spaces optional); `None` for lines that are not
/// assignments.
fn split_kv(line: &str) -> Option<(&str, &str)> {
    let t = line.trim();
    if t.starts_with('#') {
        return None;
    }
    let (k, v) = t.split_once('=')?;
    let k = k.trim();
    if k.is_empty() || k.contains(char::is_whitespace) {
        return None;
    }
    let v = v.trim();
    let v = v
        .strip_prefix('"')
        .map(|s| s.strip_suffix('"').unwrap_or(s))
        .unwrap_or(v);
    Some((k, v))
}

fn parse_extent(line: &str) -> std::result::Result<Option<ExtentLine>, String> {
    let t = line.trim();
    let mut words = t.splitn(3, char::is_whitespace);
    let access = match words.next() {
        Some("RW") => Access::Rw,
        Some("RDONLY") => Access::RdOnly,
        Some("NOACCESS") => Access::NoAccess,
        _ => return Ok(None),
    };
    let bad = |why: &str| format!("bad extent line {t:?}: {why}");
    let sectors: u64 = words
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("the size is not a number of sectors"))?;
    let rest = words.next().unwrap_or("").trim_start();
    let (kind_word, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let kind = match kind_word {
        "SPARSE" => ExtentType::Sparse,
        "FLAT" => ExtentType::Flat,
        "ZERO" => ExtentType::Zero,
        "VMFS" => ExtentType::Vmfs,
        "VMFSSPARSE" => ExtentType::VmfsSparse,
        "SESPARSE" => ExtentType::SeSparse,
        "VMFSRDM" | "VMFSRAW" => return Err(bad("raw device mappings are not supported")),
        _ => return Err(bad("unknown extent type")),
    };
    let rest = rest.trim();
    let (file, after) = if kind == ExtentType::Zero && rest.is_empty() {
        (None, "")
    } else {
        let r = rest
            .strip_prefix('"')
            .ok_or_else(|| bad("the file name must be in double quotes"))?;
        let end = r
            .find('"')
            .ok_or_else(|| bad("the file name has no closing quote"))?;
        if end == 0 {
            return Err(bad("the file name is empty"));
        }
        (Some(r[..end].to_string()), r[end + 1..].trim())
    };
    let offset = if after.is_empty() {
        0
    } else {
        after
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| bad("the offset is not a number"))?
    };
    if sectors == 0 {
        return Err(bad("an extent of 0 sectors"));
    }
    Ok(Some(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
    }))
}

impl Descriptor {
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        // An embedded descriptor ends at the first NUL.
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        // Comments may hold any bytes (Latin-1, DEL); C0 control codes mean binary garbage.
        let raw = &bytes[..end];
        if raw
            .iter()
            .any(|&b| b < 0x20 && !matches!(b, b'\n' | b'\r' | b'\t' | 0x0c))
        {
            return Err(StorageError::corrupt(
                path,
                "the VMDK descriptor holds binary garbage",
            ));
        }
        let text = String::from_utf8_lossy(raw);
        let mut d = Descriptor::default();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(e) = parse_extent(line).map_err(|e| StorageError::corrupt(path, e))? {
                d.extents.push(e);
            }
            d.lines.push(line.to_string());
        }
        if d.get("createType").is_none() && d.extents.is_empty() && d.get("CID").is_none() {
            return Err(StorageError::corrupt(
                path,
                "the VMDK descriptor has no createType, CID or extent lines",
            ));
        }
        Ok(d)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.lines
            .iter()
            .filter_map(|l| split_kv(l))
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    }

    /// Sets `key` (quoting the value when `quoted`), replacing the line in place or adding it
    /// after the header lines.
    pub fn set(&mut self, key: &str, value: &str, quoted: bool) {
        let line = if quoted {
            format!("{key}=\"{value}\"")
        } else {
            format!("{key}={value}")
        };
        if let Some(l) = self
            .lines
            .iter_mut()
            .find(|l| split_kv(l).is_some_and(|(k, _)| k.eq_ignore_ascii_case(key)))
        {
            *l = line;
            return;
        }
        // Before the first extent line or blank line after the header.
        let at = self
            .lines
            .iter()
            .position(|l| l.trim().is_empty() || parse_extent(l).ok().flatten().is_some())
            .unwrap_or(self.lines.len());
        self.lines.insert(at, line);
    }

    pub fn cid(&self, key: &str) -> Option<u32> {
        self.get(key)
            .and_then(|v| u32::from_str_radix(v.trim(), 16).ok())
    }

    pub fn text(&self) -> String {
        let mut s = self.lines.join("\n");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_descriptor_and_keeps_unknown_lines() {
        let text = "# Disk DescriptorFile\nversion=1\nCID=a454774a\nparentCID=ffffffff\n\
            createType=\"twoGbMaxExtentFlat\"\nfoo.bar = \"kept\"\n\n# Extent description\n\
            RW 4194304 FLAT \"d-f001.vmdk\" 0\nRDONLY 100 SPARSE \"d s002.vmdk\"\nNOACCESS 8 ZERO\n\n\
            ddb.uuid.image=\"0d4bcc3d-7b1d-4ce7-a2c4-6a9b1f8f1c1e\"\n";
        let mut d = Descriptor::parse(Path::new("x"), text.as_bytes()).unwrap();
        assert_eq!(d.cid("CID"), Some(0xa454774a));
        assert_eq!(d.cid("parentCID"), Some(0xffffffff));
        assert_eq!(d.get("createType"), Some("twoGbMaxExtentFlat"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[1].file.as_deref(), Some("d s002.vmdk"));
        assert_eq!(d.extents[2].kind, ExtentType::Zero);
        d.set("CID", "12345678", false);
        let out = d.text();
        assert!(out.contains("CID=12345678\n"));
        assert!(out.contains("foo.bar = \"kept\""));
        assert!(out.contains("parentCID=ffffffff"));
    }

    #[test]
    fn refuses_bad_extent_lines_and_garbage() {
        for bad in [
            "RW x FLAT \"a\" 0\n",
            "RW 10 FLAT a 0\n",
            "RW 10 BOGUS \"a\"\n",
            "RW 10 FLAT \"a\" zz\n",
            "RW 0 SPARSE \"a\"\n",
        ] {
            let text = format!("# Disk DescriptorFile\nversion=1\n{bad}");
            assert!(
                Descriptor::parse(Path::new("x"), text.as_bytes()).is_err(),
                "{bad}"
            );
        }
        assert!(Descriptor::parse(Path::new("x"), b"\x01\x02garbage\xff").is_err());
        // DEL and Latin-1 in a comment are fine (VirtualBox exports have them).
        let ok = b"# Disk DescriptorFile\nversion=1\nCID=1\nddb.comment=\"U\x7f\xe9\"\n";
        assert_eq!(
            Descriptor::parse(Path::new("x"), ok).unwrap().cid("CID"),
            Some(1)
        );
        assert!(Descriptor::parse(Path::new("x"), b"hello world\n").is_err());
    }
}
