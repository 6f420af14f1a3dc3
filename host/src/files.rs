//! Writing files that must never be seen half written (the plugin registry's record, compiled
//! plugins in the compile cache).

use std::io::Write as _;
use std::path::Path;

/// Writes `parts`, one after the other, to `path` atomically: to a temporary file beside it
/// (its directory created if missing), synced, then renamed over `path`. A crash leaves the
/// old file or the new one, never a torn one.
pub fn write_atomically(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    for part in parts {
        file.write_all(part)?;
    }
    file.as_file().sync_data()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}
