//! A new image written under a temporary name beside its final place and renamed into it only
//! when complete: a crash (kill -9) mid-way leaves the original untouched, and the half-written
//! image never carries the real name.

use std::path::{Path, PathBuf};

use crate::error::{Result, StorageError};

const TMP_PREFIX: &str = ".ferry-tmp-";

pub struct Staged {
    dst: PathBuf,
    tmp: PathBuf,
    prefix: String,
    /// The files the staged image made (main file last), removed unless committed.
    files: Vec<PathBuf>,
    committed: bool,
}

impl Staged {
    pub fn new(dst: &Path) -> Result<Self> {
        let name = dst
            .file_name()
            .ok_or_else(|| StorageError::Invalid(format!("{} is not a file name", dst.display())))?
            .to_string_lossy()
            .into_owned();
        let prefix = format!("{TMP_PREFIX}{}-", std::process::id());
        let tmp = dst.with_file_name(format!("{prefix}{name}"));
        Ok(Self {
            dst: dst.to_path_buf(),
            files: vec![tmp.clone()],
            tmp,
            prefix,
            committed: false,
        })
    }

    /// Where to create the image.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Records every file the image uses (for cleanup and the rename).
    pub fn set_files(&mut self, files: Vec<PathBuf>) {
        let mut files: Vec<PathBuf> = files.into_iter().filter(|f| *f != self.tmp).collect();
        files.push(self.tmp.clone());
        self.files = files;
    }

    /// Renames the image into place: extent files first, the main file last (the moment the
    /// new image replaces the old one). Returns the final files.
    pub fn commit(mut self) -> Result<Vec<PathBuf>> {
        let io = |p: &Path, e| StorageError::io(p, e);
        let mut finals = Vec::new();
        let extra: Vec<PathBuf> = self.files[..self.files.len() - 1].to_vec();
        for f in &extra {
            let to = self.final_name(f);
            std::fs::rename(f, &to).map_err(|e| io(f, e))?;
            finals.push(to);
        }
        if !extra.is_empty() {
            // A VMDK descriptor names its extents: point it at their final names.
            let text = std::fs::read(&self.tmp).map_err(|e| io(&self.tmp, e))?;
            if let Ok(text) = String::from_utf8(text) {
                let fixed = text.replace(&format!("\"{}", self.prefix), "\"");
                if fixed != text {
                    std::fs::write(&self.tmp, fixed).map_err(|e| io(&self.tmp, e))?;
                }
            }
        }
        let durable = crate::host_file::durable();
        if durable {
            if let Ok(f) = std::fs::File::open(&self.tmp) {
                let _ = f.sync_all();
            }
        }
        std::fs::rename(&self.tmp, &self.dst).map_err(|e| io(&self.tmp, e))?;
        finals.push(self.dst.clone());
        if let Some(dir) = self
            .dst
            .parent()
            .filter(|d| durable && !d.as_os_str().is_empty())
        {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.committed = true;
        Ok(finals)
    }

    fn final_name(&self, f: &Path) -> PathBuf {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = name.strip_prefix(&self.prefix).unwrap_or(&name).to_string();
        f.with_file_name(name)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            for f in &self.files {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}
