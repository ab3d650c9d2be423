//! Parquet manifests, read row by row with the `parquet` crate's record API (no arrow: a
//! fraction of the build). Columns as in JSON Lines; each row becomes the same JSON object a
//! JSON Lines line would be, so one parser checks both. Binary columns (embedded images, as
//! Hugging Face datasets store them) are not read: the manifest names image files.

use std::path::Path;

use parquet::basic::{ConvertedType, Type as PhysicalType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;
use serde_json::{Number, Value};

use crate::error::DatasetError;
use crate::manifest::Row;

/// The rows of a Parquet file. The `parquet` crate asserts on some malformed files (a column
/// chunk with a negative offset, found by fuzzing) instead of returning an error: such a panic
/// is caught and reported as this file's error.
pub(crate) fn read(path: &Path) -> Result<Vec<Row>, DatasetError> {
    match std::panic::catch_unwind(|| read_rows(path)) {
        Ok(result) => result,
        Err(_) => Err(DatasetError::Parquet {
            path: path.to_path_buf(),
            reason: "malformed file (the parquet reader gave up on it)".into(),
        }),
    }
}

fn read_rows(path: &Path) -> Result<Vec<Row>, DatasetError> {
    let bad = |e: parquet::errors::ParquetError| DatasetError::Parquet {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(DatasetError::io(path))?;
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    let schema = reader.metadata().file_metadata().schema();
    // Only the columns without raw bytes: an embedded-image column would be read whole.
    let kept: Vec<_> = schema
        .get_fields()
        .iter()
        .filter(|f| !has_binary(f))
        .cloned()
        .collect();
    let projection = Type::group_type_builder(schema.name())
        .with_fields(kept)
        .build()
        .map_err(bad)?;
    let mut rows = Vec::new();
    for (i, row) in reader
        .get_row_iter(Some(projection))
        .map_err(bad)?
        .enumerate()
    {
        let row = row.map_err(bad)?;
        let object = row
            .get_column_iter()
            .map(|(name, field)| (name.clone(), to_json(field)))
            .collect();
        rows.push((i + 1, object));
    }
    Ok(rows)
}

/// Whether a column holds raw bytes (a byte array that is not text, JSON or an enum).
fn has_binary(t: &Type) -> bool {
    if t.is_primitive() {
        let info = t.get_basic_info();
        t.get_physical_type() == PhysicalType::BYTE_ARRAY
            && matches!(
                info.converted_type(),
                ConvertedType::NONE | ConvertedType::BSON
            )
            && info.logical_type_ref().is_none()
    } else {
        t.get_fields().iter().any(|f| has_binary(f))
    }
}

fn number(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn to_json(field: &Field) -> Value {
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(v) => Value::from(*v),
        Field::Short(v) => Value::from(*v),
        Field::Int(v) => Value::from(*v),
        Field::Long(v) => Value::from(*v),
        Field::UByte(v) => Value::from(*v),
        Field::UShort(v) => Value::from(*v),
        Field::UInt(v) => Value::from(*v),
        Field::ULong(v) => Value::from(*v),
        Field::Float16(v) => number(f64::from(*v)),
        Field::Float(v) => number(f64::from(*v)),
        Field::Double(v) => number(*v),
        Field::Decimal(d) => Value::String(format!("{d:?}")),
        Field::Str(s) => Value::String(s.clone()),
        // Projected out above; a raw byte array inside a list or map is dropped.
        Field::Bytes(_) => Value::Null,
        Field::Date(v) | Field::TimeMillis(v) => Value::from(*v),
        Field::TimeMicros(v) | Field::TimestampMillis(v) | Field::TimestampMicros(v) => {
            Value::from(*v)
        }
        Field::Group(row) => Value::Object(
            row.get_column_iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect(),
        ),
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(to_json).collect()),
        Field::MapInternal(map) => Value::Array(
            map.entries()
                .iter()
                .map(|(k, v)| Value::Array(vec![to_json(k), to_json(v)]))
                .collect(),
        ),
    }
}
