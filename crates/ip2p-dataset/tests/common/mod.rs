//! Helpers shared by the manifest tests and the manifest fuzzing.

/// A small Parquet manifest as a Hugging Face export looks (three rows).
#[cfg(feature = "parquet")]
#[allow(dead_code)]
pub fn write_parquet(path: &std::path::Path) {
    use std::sync::Arc;

    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    // As a Hugging Face export looks: text columns, an optional integer, an embedded-bytes
    // column (not read), and an extra column (kept).
    let schema = Arc::new(
        parse_message_type(
            "message schema {
                REQUIRED BYTE_ARRAY id (UTF8);
                REQUIRED BYTE_ARRAY image (UTF8);
                REQUIRED BYTE_ARRAY prompt (UTF8);
                OPTIONAL INT64 seed;
                REQUIRED BYTE_ARRAY edited_image_bytes;
                REQUIRED INT64 score;
            }",
        )
        .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let text = |v: &[&str]| v.iter().map(|s| ByteArray::from(*s)).collect::<Vec<_>>();
    let columns: Vec<Vec<ByteArray>> = vec![
        text(&["r0", "r1", "r2"]),
        text(&["a.png", "b.png", "c.png"]),
        text(&["snow", "rain", "sun"]),
    ];
    for values in &columns {
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(values, None, None)
            .unwrap();
        col.close().unwrap();
    }
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<Int64Type>()
        .write_batch(&[5], Some(&[0, 1, 0]), None)
        .unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&vec![ByteArray::from(vec![0u8, 1, 2]); 3], None, None)
        .unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<Int64Type>()
        .write_batch(&[10, 20, 30], None, None)
        .unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
}
