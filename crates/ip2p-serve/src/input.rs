//! A submission's body (multipart or JSON with a base64 image) and its image, checked and
//! brought to the size the edit runs at.

use std::io::Cursor;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use base64::Engine;
use image::RgbImage;
use ip2p_vae::image_io::{ResizeRule, decode_image_limited, resize_for_vae, target_size};

use crate::error::ApiError;
use crate::params::EditRequest;

/// Output images above this many pixels are refused (2048², 16× SD 1.5's 512²).
pub const MAX_OUTPUT_PIXELS: u64 = 2048 * 2048;

/// Read the fields and the image bytes of `POST /api/edits`.
pub async fn read_submission(req: Request) -> Result<(EditRequest, Bytes), ApiError> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if content_type.starts_with("multipart/form-data") {
        let mut multipart = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let mut fields = EditRequest::default();
        let mut image = None;
        while let Some(field) = multipart.next_field().await? {
            let name = field.name().unwrap_or("").to_string();
            if name == "image" {
                image = Some(field.bytes().await?);
            } else {
                let text = field.text().await?;
                fields.set_field(&name, &text)?;
            }
        }
        let image = image.ok_or_else(|| ApiError::bad("image: missing (a file field)"))?;
        Ok((fields, image))
    } else if content_type.starts_with("application/json") {
        let body = Bytes::from_request(req, &()).await.map_err(|e| {
            let status = e.status();
            ApiError::new(status, format!("reading the body: {}", e.body_text()))
        })?;
        let mut fields = EditRequest::from_json(&body)?;
        let b64 = fields
            .image
            .take()
            .ok_or_else(|| ApiError::bad("image: missing (base64 or a data: URL)"))?;
        // A data URL's header, if any, is everything up to the first comma.
        let b64 = match b64.split_once(',') {
            Some((head, rest)) if head.starts_with("data:") => rest,
            _ => b64.as_str(),
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| ApiError::bad(format!("image: not base64: {e}")))?;
        Ok((fields, Bytes::from(bytes)))
    } else {
        Err(ApiError::new(
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send multipart/form-data (an image file and fields) or application/json (a base64 image)",
        ))
    }
}

/// Decode the image (PNG, JPEG, WebP), refuse one over `max_pixels` (413) before decoding it,
/// and resize it by the original's rule: long side `resolution`, sides multiples of 64,
/// centre crop.
pub fn prepare_image(
    bytes: &[u8],
    resolution: u32,
    vae_factor: u32,
    max_pixels: u64,
) -> Result<RgbImage, ApiError> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::bad(format!("image: {e}")))?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ApiError::bad(format!("image: not a PNG, JPEG or WebP image: {e}")))?;
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(ApiError::too_large(format!(
            "image: {w}×{h} is {pixels} pixels; the limit is {max_pixels}"
        )));
    }
    let img = decode_image_limited(bytes, "image", max_pixels)
        .map_err(|e| ApiError::bad(e.to_string()))?;
    let rule = ResizeRule::Ip2p { resolution };
    let (tw, th) = target_size(w, h, rule, vae_factor);
    if tw as u64 * th as u64 > MAX_OUTPUT_PIXELS {
        return Err(ApiError::bad(format!(
            "image: {w}×{h} at resolution {resolution} would be edited at {tw}×{th}, over {MAX_OUTPUT_PIXELS} pixels; lower the resolution or crop"
        )));
    }
    resize_for_vae(&img, rule, vae_factor).map_err(|e| ApiError::bad(format!("image: {e}")))
}
