//! The result file: a PNG whose `parameters` text chunk holds the settings that made it.

use image::RgbImage;

use crate::params::EditParams;

/// The text chunk's keyword (the one other Stable Diffusion tools read too).
pub const PARAMETERS_KEY: &str = "parameters";

/// Encode RGB8 pixels as PNG with `tEXt` chunks. Deterministic: the same pixels and text give
/// the same bytes.
pub fn encode_png(
    width: u32,
    height: u32,
    rgb: &[u8],
    text: &[(&str, String)],
) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        encoder.add_text_chunk(key.to_string(), value.clone())?;
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

/// The edited image as PNG, its parameters (JSON: prompt, steps, guidance, seed, ...,
/// `model`: the model folder's name) in the `parameters` chunk.
pub fn result_png(
    img: &RgbImage,
    params: &EditParams,
    model: &str,
) -> Result<Vec<u8>, png::EncodingError> {
    let mut meta = serde_json::to_value(params).unwrap_or_default();
    meta["model"] = serde_json::Value::String(model.to_string());
    meta["software"] = concat!("ip2p ", env!("CARGO_PKG_VERSION")).into();
    encode_png(
        img.width(),
        img.height(),
        img.as_raw(),
        &[(PARAMETERS_KEY, ascii_json(&meta.to_string()))],
    )
}

/// JSON with every non-ASCII character as a `\uXXXX` escape: `tEXt` is Latin-1, and prompts
/// are not. (Non-ASCII only occurs inside JSON strings, so the escapes are valid there.)
fn ascii_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

/// The `parameters` chunk of a PNG, if it has one.
pub fn read_parameters(png_bytes: &[u8]) -> Option<String> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let reader = decoder.read_info().ok()?;
    reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == PARAMETERS_KEY)
        .map(|t| t.text.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_ascii_prompts_survive_the_text_chunk() {
        let json = serde_json::json!({ "prompt": "make it 雪 ❄️" }).to_string();
        let escaped = ascii_json(&json);
        assert!(escaped.is_ascii());
        let back: serde_json::Value = serde_json::from_str(&escaped).unwrap();
        assert_eq!(back["prompt"], "make it 雪 ❄️");
        let png = encode_png(1, 1, &[1, 2, 3], &[(PARAMETERS_KEY, escaped.clone())]).unwrap();
        assert_eq!(read_parameters(&png).as_deref(), Some(escaped.as_str()));
    }
}
