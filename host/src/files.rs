//! Writing files that must never be seen half written (the plugin registry's record, compiled
//! plugins in the compile cache), and creating directories with errors that say why.

use std::io::Write as _;
use std::path::Path;

/// Writes `parts`, one after the other, to `path` atomically: to a temporary file beside it
/// (its directory created if missing), synced, then renamed over `path`. A crash leaves the
/// old file or the new one, never a torn one.
pub fn write_atomically(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    for part in parts {
        file.write_all(part)?;
    }
    file.as_file().sync_data()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Creates `dir` and its parents. When a parent is a file, the error says so (`X is a file,
/// not a directory`) instead of the OS's "File exists".
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        match dir
            .ancestors()
            .find(|a| !a.as_os_str().is_empty() && a.exists() && !a.is_dir())
        {
            Some(file) => std::io::Error::new(
                e.kind(),
                format!("{} is a file, not a directory", file.display()),
            ),
            None => e,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_in_the_way_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("afile");
        std::fs::write(&file, "x").expect("write");
        let error = create_dir_all(&file.join("sub/deeper")).expect_err("a file in the way");
        assert_eq!(
            error.to_string(),
            format!("{} is a file, not a directory", file.display())
        );
        create_dir_all(&dir.path().join("a/b")).expect("created");
        assert!(dir.path().join("a/b").is_dir());
    }
}
