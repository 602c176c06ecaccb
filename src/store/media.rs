//! Media metadata: `media` (local uploads, ids reserved for an async upload, cached remote media) and
//! `media_thumbnails` (thumbnails made so far). The files themselves live in the media folder.

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::Db;

/// One row of `media`.
#[derive(Clone, Debug, PartialEq)]
pub struct MediaRow {
    pub origin: String,
    pub media_id: String,
    pub uploader: Option<String>,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    /// None: created for an async upload, no content yet.
    pub size: Option<i64>,
    pub created_ts: i64,
    /// Stored while the legacy endpoints were frozen (`media.freeze_legacy`): served only through the
    /// authenticated ones.
    pub authenticated: bool,
}

pub fn get(conn: Db<'_>, origin: &str, media_id: &str) -> Result<Option<MediaRow>> {
    Ok(conn
        .prepare_cached(
            "SELECT origin, media_id, uploader, content_type, filename, size, created_ts, authenticated FROM media
             WHERE origin = ?1 AND media_id = ?2",
        )?
        .query_row(params![origin, media_id], |r| {
            Ok(MediaRow {
                origin: r.get(0)?,
                media_id: r.get(1)?,
                uploader: r.get(2)?,
                content_type: r.get(3)?,
                filename: r.get(4)?,
                size: r.get(5)?,
                created_ts: r.get(6)?,
                authenticated: r.get(7)?,
            })
        })
        .optional()?)
}

/// Bytes uploaded by a local user (reserved ids without content count 0).
pub fn usage_of(conn: Db<'_>, uploader: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT coalesce(sum(size), 0) FROM media WHERE uploader = ?1")?
        .query_row([uploader], |r| r.get(0))?)
}

/// Drops the ids `uploader` reserved at or before `created_before` and never filled.
pub fn drop_stale_reservations(conn: Db<'_>, uploader: &str, created_before: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM media WHERE uploader = ?1 AND size IS NULL AND created_ts <= ?2")?
        .execute(params![uploader, created_before])?;
    Ok(())
}

/// How many ids `uploader` reserved after `created_after` that are still waiting for content.
pub fn pending_reservations(conn: Db<'_>, uploader: &str, created_after: i64) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT count(*) FROM media WHERE uploader = ?1 AND size IS NULL AND created_ts > ?2")?
        .query_row(params![uploader, created_after], |r| r.get(0))?)
}

/// Reserves an id for an async upload (`POST /create`): a row without content.
pub fn reserve(
    conn: Db<'_>,
    origin: &str,
    media_id: &str,
    uploader: &str,
    now: i64,
    authenticated: bool,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO media (origin, media_id, uploader, created_ts, authenticated) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![origin, media_id, uploader, now, authenticated])?;
    Ok(())
}

/// Gives a reserved id its content; false when the id is unknown or already has content.
pub fn fill_reserved(conn: Db<'_>, row: &MediaRow, size: i64, sha256: &str) -> Result<bool> {
    let n = conn
        .prepare_cached(
            "UPDATE media SET content_type = ?3, filename = ?4, size = ?5, sha256 = ?6
             WHERE origin = ?1 AND media_id = ?2 AND size IS NULL",
        )?
        .execute(params![row.origin, row.media_id, row.content_type, row.filename, size, sha256])?;
    Ok(n == 1)
}

/// Records a new upload with its content.
pub fn insert_upload(conn: Db<'_>, row: &MediaRow, size: i64, sha256: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO media (origin, media_id, uploader, content_type, filename, size, sha256, created_ts, authenticated)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        row.origin,
        row.media_id,
        row.uploader,
        row.content_type,
        row.filename,
        size,
        sha256,
        row.created_ts,
        row.authenticated
    ])?;
    Ok(())
}

/// Records (or replaces) a remote file cached here; the uploader is always NULL.
pub fn cache_remote(conn: Db<'_>, row: &MediaRow, sha256: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO media
             (origin, media_id, uploader, content_type, filename, size, sha256, created_ts, authenticated)
         VALUES (?1, ?2, NULL, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        row.origin,
        row.media_id,
        row.content_type,
        row.filename,
        row.size,
        sha256,
        row.created_ts,
        row.authenticated
    ])?;
    Ok(())
}

/// Up to `limit` cached remote files (not local uploads) cached before `cached_before` (ms): `(origin, media_id,
/// size)`, oldest first.
pub fn remote_cached_before(conn: Db<'_>, cached_before: i64, limit: i64) -> Result<Vec<(String, String, i64)>> {
    let mut stmt = conn.prepare(
        "SELECT origin, media_id, coalesce(size, 0) FROM media WHERE uploader IS NULL AND created_ts < ?1
         ORDER BY created_ts LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![cached_before, limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Forgets a cached remote file and its thumbnails (the caller deletes the files); local uploads are never touched.
pub fn forget_remote(conn: Db<'_>, origin: &str, media_id: &str) -> Result<bool> {
    let n = conn.execute(
        "DELETE FROM media WHERE origin = ?1 AND media_id = ?2 AND uploader IS NULL",
        params![origin, media_id],
    )?;
    if n == 1 {
        conn.execute("DELETE FROM media_thumbnails WHERE origin = ?1 AND media_id = ?2", params![origin, media_id])?;
    }
    Ok(n == 1)
}

/// The requested (normalised) size of a thumbnail: its key besides the media.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThumbnailSize<'a> {
    pub width: u32,
    pub height: u32,
    /// `scale` or `crop`.
    pub method: &'a str,
}

/// The content type of a thumbnail made before, if any.
pub fn thumbnail_content_type(
    conn: Db<'_>,
    origin: &str,
    media_id: &str,
    size: ThumbnailSize<'_>,
) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached(
            "SELECT content_type FROM media_thumbnails WHERE origin = ?1 AND media_id = ?2 AND width = ?3
             AND height = ?4 AND method = ?5",
        )?
        .query_row(params![origin, media_id, size.width, size.height, size.method], |r| r.get(0))
        .optional()?)
}

/// Records (or replaces) a thumbnail made now.
pub fn record_thumbnail(
    conn: Db<'_>,
    origin: &str,
    media_id: &str,
    size: ThumbnailSize<'_>,
    content_type: &str,
    bytes: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO media_thumbnails (origin, media_id, width, height, method, content_type, size)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![origin, media_id, size.width, size.height, size.method, content_type, bytes])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::memory_db;

    fn upload(media_id: &str, uploader: Option<&str>, ts: i64) -> MediaRow {
        MediaRow {
            origin: "hs.test".into(),
            media_id: media_id.into(),
            uploader: uploader.map(str::to_owned),
            content_type: Some("image/png".into()),
            filename: Some("a.png".into()),
            size: None,
            created_ts: ts,
            authenticated: false,
        }
    }

    #[test]
    fn uploads_read_back_and_count_towards_usage() {
        let conn = memory_db();
        assert_eq!(get(conn.db(), "hs.test", "a").unwrap(), None);
        assert_eq!(usage_of(conn.db(), "@u:hs.test").unwrap(), 0);
        insert_upload(conn.db(), &upload("a", Some("@u:hs.test"), 5), 100, "ff").unwrap();
        insert_upload(conn.db(), &upload("b", Some("@u:hs.test"), 6), 20, "ee").unwrap();
        insert_upload(conn.db(), &upload("c", Some("@v:hs.test"), 6), 7, "dd").unwrap();
        let got = get(conn.db(), "hs.test", "a").unwrap().unwrap();
        assert_eq!(got, MediaRow { size: Some(100), ..upload("a", Some("@u:hs.test"), 5) });
        assert_eq!(usage_of(conn.db(), "@u:hs.test").unwrap(), 120);
        assert!(insert_upload(conn.db(), &upload("a", Some("@u:hs.test"), 5), 1, "ff").is_err(), "ids are unique");
    }

    #[test]
    fn reservations_fill_once_and_expire() {
        let conn = memory_db();
        reserve(conn.db(), "hs.test", "old", "@u:hs.test", 10, false).unwrap();
        reserve(conn.db(), "hs.test", "new", "@u:hs.test", 50, false).unwrap();
        reserve(conn.db(), "hs.test", "other", "@v:hs.test", 10, false).unwrap();
        assert_eq!(pending_reservations(conn.db(), "@u:hs.test", 0).unwrap(), 2);
        assert_eq!(pending_reservations(conn.db(), "@u:hs.test", 10).unwrap(), 1, "strictly after");
        assert_eq!(usage_of(conn.db(), "@u:hs.test").unwrap(), 0, "no content, no usage");

        drop_stale_reservations(conn.db(), "@u:hs.test", 10).unwrap();
        assert_eq!(get(conn.db(), "hs.test", "old").unwrap(), None, "at or before the cut-off");
        assert!(get(conn.db(), "hs.test", "new").unwrap().is_some());
        assert!(get(conn.db(), "hs.test", "other").unwrap().is_some(), "only the uploader's own");

        let filled = MediaRow { content_type: Some("text/plain".into()), ..upload("new", Some("@u:hs.test"), 50) };
        assert!(fill_reserved(conn.db(), &filled, 3, "aa").unwrap());
        assert!(!fill_reserved(conn.db(), &filled, 4, "bb").unwrap(), "content is never replaced");
        assert!(!fill_reserved(conn.db(), &upload("nope", None, 0), 4, "bb").unwrap());
        let got = get(conn.db(), "hs.test", "new").unwrap().unwrap();
        assert_eq!((got.size, got.content_type.as_deref(), got.created_ts), (Some(3), Some("text/plain"), 50));
        assert_eq!(pending_reservations(conn.db(), "@u:hs.test", 0).unwrap(), 0);
        drop_stale_reservations(conn.db(), "@u:hs.test", 1000).unwrap();
        assert!(get(conn.db(), "hs.test", "new").unwrap().is_some(), "filled ids are not reservations");
    }

    #[test]
    fn remote_media_is_cached_without_an_uploader() {
        let conn = memory_db();
        let mut row = MediaRow { origin: "remote.test".into(), size: Some(9), ..upload("r", Some("@ignored:x"), 1) };
        cache_remote(conn.db(), &row, "cc").unwrap();
        row.size = Some(10);
        cache_remote(conn.db(), &row, "cc").unwrap();
        let got = get(conn.db(), "remote.test", "r").unwrap().unwrap();
        assert_eq!((got.uploader, got.size), (None, Some(10)));
        assert_eq!(get(conn.db(), "hs.test", "r").unwrap(), None, "origin is part of the key");
    }

    #[test]
    fn old_remote_media_is_forgotten_and_uploads_stay() {
        let conn = memory_db();
        let remote = |id: &str, ts| MediaRow { origin: "remote.test".into(), size: Some(3), ..upload(id, None, ts) };
        cache_remote(conn.db(), &remote("old", 10), "aa").unwrap();
        cache_remote(conn.db(), &remote("new", 100), "bb").unwrap();
        insert_upload(conn.db(), &upload("mine", Some("@u:hs.test"), 1), 5, "cc").unwrap();
        record_thumbnail(
            conn.db(),
            "remote.test",
            "old",
            ThumbnailSize { width: 1, height: 1, method: "scale" },
            "image/png",
            1,
        )
        .unwrap();
        assert_eq!(remote_cached_before(conn.db(), 50, 10).unwrap(), [("remote.test".into(), "old".into(), 3)]);
        assert_eq!(remote_cached_before(conn.db(), 1000, 1).unwrap().len(), 1, "limited");
        assert!(forget_remote(conn.db(), "remote.test", "old").unwrap());
        assert!(!forget_remote(conn.db(), "hs.test", "mine").unwrap(), "local uploads are never purged");
        assert!(get(conn.db(), "hs.test", "mine").unwrap().is_some());
        assert_eq!(remote_cached_before(conn.db(), 50, 10).unwrap(), []);
    }

    #[test]
    fn thumbnails_are_keyed_by_size_and_method() {
        let conn = memory_db();
        let scale = ThumbnailSize { width: 32, height: 32, method: "scale" };
        let crop = ThumbnailSize { method: "crop", ..scale };
        assert_eq!(thumbnail_content_type(conn.db(), "hs.test", "a", scale).unwrap(), None);
        record_thumbnail(conn.db(), "hs.test", "a", scale, "image/png", 10).unwrap();
        assert_eq!(thumbnail_content_type(conn.db(), "hs.test", "a", scale).unwrap().as_deref(), Some("image/png"));
        assert_eq!(thumbnail_content_type(conn.db(), "hs.test", "a", crop).unwrap(), None);
        record_thumbnail(conn.db(), "hs.test", "a", scale, "image/jpeg", 12).unwrap();
        assert_eq!(thumbnail_content_type(conn.db(), "hs.test", "a", scale).unwrap().as_deref(), Some("image/jpeg"));
    }
}
