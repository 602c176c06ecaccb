//! The media folder on disk (`files/`, `thumbs/`, `tmp/`) and the in-flight remote fetches: the media API's
//! handle, held by the HTTP state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The media folder and in-flight remote fetches (one fetch per remote file at a time).
pub struct MediaRepo {
    pub root: PathBuf,
    fetches: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl MediaRepo {
    /// Creates the folder layout under `root`.
    pub fn new(root: PathBuf) -> anyhow::Result<MediaRepo> {
        for sub in ["files", "thumbs", "tmp"] {
            std::fs::create_dir_all(root.join(sub))
                .map_err(|e| anyhow::anyhow!("cannot create the media folder {}: {e}", root.join(sub).display()))?;
        }
        Ok(MediaRepo { root, fetches: Mutex::new(HashMap::new()) })
    }

    pub fn file_path(&self, origin: &str, media_id: &str) -> PathBuf {
        self.root.join("files").join(origin).join(prefix(media_id)).join(media_id)
    }

    pub fn thumb_path(&self, origin: &str, media_id: &str, width: u32, height: u32, method: &str) -> PathBuf {
        self.root
            .join("thumbs")
            .join(origin)
            .join(prefix(media_id))
            .join(media_id)
            .join(format!("{width}x{height}-{method}"))
    }

    /// Deletes a file and its thumbnails (a purged cached remote file); missing files are fine.
    pub fn remove(&self, origin: &str, media_id: &str) {
        let _ = std::fs::remove_file(self.file_path(origin, media_id));
        let _ = std::fs::remove_dir_all(self.root.join("thumbs").join(origin).join(prefix(media_id)).join(media_id));
    }

    pub fn tmp_path(&self) -> PathBuf {
        self.root.join("tmp").join(crate::util::random_string(24))
    }

    /// The lock serialising fetches of one remote file.
    pub fn fetch_lock(&self, origin: &str, media_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.fetches.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, l| Arc::strong_count(l) > 1);
        m.entry(format!("{origin}/{media_id}")).or_default().clone()
    }
}

fn prefix(media_id: &str) -> &str {
    media_id.get(..2).unwrap_or(media_id)
}
