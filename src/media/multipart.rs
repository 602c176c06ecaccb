//! `multipart/mixed` as the federation media endpoints use it (spec v1.11): a JSON metadata part, then the file
//! (or a `Location` redirect, which Hearth never sends and does not follow).

use std::collections::HashMap;

/// One part: lower-cased header names to values, and the content.
#[derive(Debug, Default)]
pub struct Part {
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

/// The `boundary` parameter of a `multipart/*` content type.
pub fn boundary_of(content_type: &str) -> Option<String> {
    let mut it = content_type.split(';');
    let essence = it.next()?.trim().to_ascii_lowercase();
    if !essence.starts_with("multipart/") {
        return None;
    }
    it.find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        (k.trim().eq_ignore_ascii_case("boundary")).then(|| v.trim().trim_matches('"').to_owned())
    })
    .filter(|b| !b.is_empty())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Splits a multipart body into its parts.
pub fn parse(body: &[u8], boundary: &str) -> Option<Vec<Part>> {
    let delim = format!("--{boundary}");
    let mut pos = find(body, delim.as_bytes())? + delim.len();
    let next_delim = format!("\r\n--{boundary}");
    let mut parts = Vec::new();
    loop {
        let rest = &body[pos..];
        if rest.starts_with(b"--") {
            break;
        }
        let rest = rest.strip_prefix(b"\r\n").or_else(|| rest.strip_prefix(b"\n")).unwrap_or(rest);
        let start = body.len() - rest.len();
        let end = find(rest, next_delim.as_bytes())?;
        parts.push(parse_part(&body[start..start + end]));
        pos = start + end + next_delim.len();
    }
    Some(parts)
}

fn parse_part(raw: &[u8]) -> Part {
    let (head, body) = if let Some(b) = raw.strip_prefix(b"\r\n") {
        (&raw[..0], b)
    } else {
        match find(raw, b"\r\n\r\n") {
            Some(i) => (&raw[..i], &raw[i + 4..]),
            None => (raw, &raw[raw.len()..]),
        }
    };
    let headers = String::from_utf8_lossy(head)
        .split("\r\n")
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned())))
        .collect();
    Part { headers, body: body.to_vec() }
}

/// The opening of a federation media answer: the metadata part and the headers of the file part.
pub fn head(boundary: &str, content_type: &str, disposition: &str) -> Vec<u8> {
    format!(
        "--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{boundary}\r\nContent-Type: {content_type}\r\nContent-Disposition: {disposition}\r\n\r\n"
    )
    .into_bytes()
}

/// The closing delimiter.
pub fn tail(boundary: &str) -> Vec<u8> {
    format!("\r\n--{boundary}--\r\n").into_bytes()
}

/// The file name of a `Content-Disposition` value (`filename*=utf-8''...` preferred over `filename=`).
pub fn disposition_filename(v: &str) -> Option<String> {
    let mut plain = None;
    for p in v.split(';').map(str::trim) {
        if let Some(ext) = p.strip_prefix("filename*=") {
            let (charset, rest) = ext.split_once("''")?;
            if charset.eq_ignore_ascii_case("utf-8") {
                return Some(crate::util::percent_decode(&rest.replace('+', "%2B")));
            }
        } else if let Some(n) = p.strip_prefix("filename=") {
            plain = Some(n.trim_matches('"').to_owned());
        }
    }
    plain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut body = head("b0und", "image/png", "inline; filename=\"a.png\"");
        body.extend_from_slice(b"\x89PNG\r\n--not-the-boundary\r\n");
        body.extend_from_slice(&tail("b0und"));
        let parts = parse(&body, "b0und").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].headers["content-type"], "application/json");
        assert_eq!(parts[0].body, b"{}");
        assert_eq!(parts[1].headers["content-type"], "image/png");
        assert_eq!(parts[1].body, b"\x89PNG\r\n--not-the-boundary\r\n");
        assert_eq!(boundary_of("multipart/mixed; boundary=\"b0und\"").as_deref(), Some("b0und"));
        assert_eq!(boundary_of("image/png"), None);
    }

    #[test]
    fn filenames() {
        assert_eq!(disposition_filename("inline; filename=\"a b.png\"").as_deref(), Some("a b.png"));
        assert_eq!(
            disposition_filename("attachment; filename*=utf-8''%C3%A9t%C3%A9+1.txt").as_deref(),
            Some("été+1.txt")
        );
        assert_eq!(disposition_filename("inline"), None);
    }
}
