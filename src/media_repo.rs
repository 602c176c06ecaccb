//! The media folder on disk (`files/`, `thumbs/`, `tmp/`), the in-flight remote fetches and thumbnail decodes, and
//! the memory budget of image decoding: the media API's handle, held by the HTTP state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

type Locks = Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// The media folder, in-flight work (one fetch per remote file, one decode per thumbnail, at a time) and the
/// decoding budget.
pub struct MediaRepo {
    pub root: PathBuf,
    fetches: Locks,
    thumbnails: Locks,
    /// Thumbnail decoding memory, one permit per MiB (`media.thumbnail_memory_mb`).
    pub decode_budget: tokio::sync::Semaphore,
    pub decode_budget_mb: u32,
    /// `media.max_image_pixels`.
    pub max_image_pixels: u64,
}

impl MediaRepo {
    /// Creates the folder layout under `root`.
    pub fn new(root: PathBuf, config: &crate::config::Media) -> anyhow::Result<MediaRepo> {
        for sub in ["files", "thumbs", "tmp"] {
            std::fs::create_dir_all(root.join(sub))
                .map_err(|e| anyhow::anyhow!("cannot create the media folder {}: {e}", root.join(sub).display()))?;
        }
        Ok(MediaRepo {
            root,
            fetches: Mutex::default(),
            thumbnails: Mutex::default(),
            decode_budget: tokio::sync::Semaphore::new(config.thumbnail_memory_mb as usize),
            decode_budget_mb: config.thumbnail_memory_mb,
            max_image_pixels: config.max_image_pixels,
        })
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
        lock_of(&self.fetches, format!("{origin}/{media_id}"))
    }

    /// The lock serialising the making of one thumbnail (`key` names the file and size): identical requests
    /// arriving together wait for the first, then find its result cached, so N of them cost one decode.
    pub fn thumbnail_lock(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        lock_of(&self.thumbnails, key)
    }
}

fn lock_of(locks: &Locks, key: String) -> Arc<tokio::sync::Mutex<()>> {
    let mut m = locks.lock().unwrap_or_else(|e| e.into_inner());
    m.retain(|_, l| Arc::strong_count(l) > 1);
    m.entry(key).or_default().clone()
}

fn prefix(media_id: &str) -> &str {
    media_id.get(..2).unwrap_or(media_id)
}
