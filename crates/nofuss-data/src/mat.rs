//! A reader for MATLAB Level 5 MAT-files (the format of Cars196's `cars_annos.mat`).
//!
//! Reads what annotation files hold: numeric arrays of every class (stored in any of
//! the format's integer or floating types, returned as `f64`), logical arrays, char
//! arrays (UTF-8, UTF-16 or 8-bit), cell arrays and struct arrays, nested to any
//! reasonable depth, in `miCOMPRESSED` (zlib) and plain elements, little- and big-endian.
//! Sparse matrices, objects and function handles are reported as unsupported; complex
//! arrays keep their real part and say so in [`MatValue::Numeric::complex`].
//!
//! The reader never trusts a size field: every length is checked against the bytes that
//! are left, element counts against the dimensions, decompression is capped, and
//! nesting is limited, so a damaged or hostile file gives a [`MatError`], never a panic
//! or an unbounded allocation.
//!
//! ```no_run
//! let file = nofuss_data::mat::read("cars_annos.mat")?;
//! let annotations = file.get("annotations").ok_or("no annotations")?;
//! println!("{} annotations", annotations.len());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::Read;
use std::path::Path;

/// What went wrong, and where in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("byte {offset} ({context}): {message}")]
pub struct MatError {
    /// Offset in the file (for data inside a compressed element: of that element).
    pub offset: usize,
    /// The variable or field being read, e.g. `annotations(3).class`.
    pub context: String,
    /// What is wrong.
    pub message: String,
}

/// A MATLAB array class, as stored in the array flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatClass {
    /// `double`.
    Double,
    /// `single`.
    Single,
    /// `int8`.
    Int8,
    /// `uint8`.
    Uint8,
    /// `int16`.
    Int16,
    /// `uint16`.
    Uint16,
    /// `int32`.
    Int32,
    /// `uint32`.
    Uint32,
    /// `int64` (values beyond 2^53 lose precision as `f64`).
    Int64,
    /// `uint64` (values beyond 2^53 lose precision as `f64`).
    Uint64,
}

/// One MATLAB array. Elements are in MATLAB's column-major order.
#[derive(Debug, Clone, PartialEq)]
pub enum MatValue {
    /// A numeric or logical array.
    Numeric {
        /// Dimensions (at least two).
        dims: Vec<usize>,
        /// The class MATLAB reports.
        class: MatClass,
        /// Whether MATLAB flags it logical.
        logical: bool,
        /// Whether it had an imaginary part (dropped).
        complex: bool,
        /// Real parts.
        data: Vec<f64>,
    },
    /// A char array; `text` holds its characters in column-major order.
    Char {
        /// Dimensions.
        dims: Vec<usize>,
        /// The characters.
        text: Vec<char>,
    },
    /// A cell array.
    Cell {
        /// Dimensions.
        dims: Vec<usize>,
        /// The cells.
        items: Vec<MatValue>,
    },
    /// A struct array: for each element, one value per field.
    Struct {
        /// Dimensions.
        dims: Vec<usize>,
        /// Field names, in the file's order.
        fields: Vec<String>,
        /// `items[e][f]`: field `f` of element `e`.
        items: Vec<Vec<MatValue>>,
    },
}

impl MatValue {
    /// Dimensions of the array.
    pub fn dims(&self) -> &[usize] {
        match self {
            Self::Numeric { dims, .. }
            | Self::Char { dims, .. }
            | Self::Cell { dims, .. }
            | Self::Struct { dims, .. } => dims,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.dims().iter().product()
    }

    /// Whether the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A short name of the kind of array, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Numeric { logical: true, .. } => "logical array",
            Self::Numeric { .. } => "numeric array",
            Self::Char { .. } => "char array",
            Self::Cell { .. } => "cell array",
            Self::Struct { .. } => "struct array",
        }
    }

    /// The text of a char row vector (or an empty char array).
    pub fn as_str(&self) -> Option<String> {
        match self {
            Self::Char { dims, text } if dims.len() == 2 && (dims[0] <= 1 || dims[1] <= 1) => {
                Some(text.iter().collect())
            }
            _ => None,
        }
    }

    /// The value of a numeric array with exactly one element.
    pub fn as_scalar(&self) -> Option<f64> {
        match self {
            Self::Numeric { data, .. } if data.len() == 1 => Some(data[0]),
            _ => None,
        }
    }

    /// Field `name` of element `index` of a struct array.
    pub fn field(&self, index: usize, name: &str) -> Option<&MatValue> {
        match self {
            Self::Struct { fields, items, .. } => {
                let f = fields.iter().position(|n| n == name)?;
                items.get(index)?.get(f)
            }
            _ => None,
        }
    }

    /// Cell `index` of a cell array.
    pub fn cell(&self, index: usize) -> Option<&MatValue> {
        match self {
            Self::Cell { items, .. } => items.get(index),
            _ => None,
        }
    }
}

/// The variables of a MAT-file, in file order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MatFile {
    /// The header text (description, platform, creation date).
    pub header: String,
    /// `(name, value)` pairs.
    pub variables: Vec<(String, MatValue)>,
}

impl MatFile {
    /// The variable called `name`.
    pub fn get(&self, name: &str) -> Option<&MatValue> {
        self.variables
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }
}

/// The most bytes one compressed element may inflate to (1 GiB).
const MAX_INFLATED: u64 = 1 << 30;
/// The deepest nesting of cells and structs accepted.
const MAX_DEPTH: usize = 64;

// Data types of the element tags.
const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;
const MI_UTF32: u32 = 18;

/// Reads the MAT-file at `path`.
pub fn read(path: impl AsRef<Path>) -> crate::Result<MatFile> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| crate::DataError::io(path, e))?;
    parse(&bytes).map_err(|e| crate::DataError::Inconsistent {
        path: path.to_path_buf(),
        message: format!("not a MAT-file we can read: {e}"),
    })
}

/// Parses a MAT-file held in memory.
pub fn parse(bytes: &[u8]) -> Result<MatFile, MatError> {
    let err = |offset, message: &str| MatError {
        offset,
        context: "header".into(),
        message: message.into(),
    };
    if bytes.len() < 128 {
        return Err(err(0, "shorter than the 128-byte MAT-file header"));
    }
    if bytes.starts_with(b"MATLAB 7.3") {
        return Err(err(
            0,
            "a MAT-file version 7.3 (HDF5); save it with -v7 or read it with h5py",
        ));
    }
    let big = match &bytes[126..128] {
        b"IM" => false,
        b"MI" => true,
        _ => {
            return Err(err(
                126,
                "no endian indicator: not a Level 5 MAT-file (Level 4 files are not supported)",
            ))
        }
    };
    let version = if big {
        u16::from_be_bytes([bytes[124], bytes[125]])
    } else {
        u16::from_le_bytes([bytes[124], bytes[125]])
    };
    if version != 0x0100 {
        return Err(err(
            124,
            &format!("unknown MAT-file version {version:#06x}"),
        ));
    }
    let header = String::from_utf8_lossy(&bytes[..116])
        .trim_end_matches(['\0', ' '])
        .to_string();
    let mut file = MatFile {
        header,
        variables: Vec::new(),
    };
    let mut r = Reader {
        bytes,
        pos: 128,
        big,
        base: 0,
    };
    while r.pos < bytes.len() {
        // Trailing padding shorter than a tag is tolerated.
        if bytes.len() - r.pos < 8 && bytes[r.pos..].iter().all(|&b| b == 0) {
            break;
        }
        let start = r.pos;
        let tag = r.tag("top level")?;
        let body = r.take(tag.size, "top level")?;
        // Compressed elements are not padded; others are, to 8 bytes.
        if tag.ty != MI_COMPRESSED {
            r.align(tag.small);
        }
        match tag.ty {
            MI_COMPRESSED => {
                let inflated = inflate(body).map_err(|m| MatError {
                    offset: start,
                    context: "compressed variable".into(),
                    message: m,
                })?;
                let mut inner = Reader {
                    bytes: &inflated,
                    pos: 0,
                    big,
                    base: start,
                };
                let t = inner.tag("compressed variable")?;
                if t.ty != MI_MATRIX {
                    return Err(inner.err(
                        "compressed variable",
                        format!("holds data type {} instead of a matrix", t.ty),
                    ));
                }
                let body = inner.take(t.size, "compressed variable")?;
                let mut m = Reader {
                    bytes: body,
                    pos: 0,
                    big,
                    base: start,
                };
                if let Some((name, value)) = m.matrix("", 0)? {
                    file.variables.push((name, value));
                }
            }
            MI_MATRIX => {
                let mut m = Reader {
                    bytes: body,
                    pos: 0,
                    big,
                    base: start + 8,
                };
                if let Some((name, value)) = m.matrix("", 0)? {
                    file.variables.push((name, value));
                }
            }
            other => {
                return Err(MatError {
                    offset: start,
                    context: "top level".into(),
                    message: format!("unexpected data type {other} where a variable belongs"),
                })
            }
        }
    }
    Ok(file)
}

fn inflate(body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(body)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("zlib data is damaged: {e}"))?;
    if out.len() as u64 > MAX_INFLATED {
        return Err(format!("inflates to more than {MAX_INFLATED} bytes"));
    }
    Ok(out)
}

struct Tag {
    ty: u32,
    size: usize,
    /// Small data element format (data packed in the tag's second word).
    small: bool,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    big: bool,
    /// Offset of `bytes` in the file, for messages.
    base: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, context: &str, message: impl Into<String>) -> MatError {
        MatError {
            offset: self.base + self.pos,
            context: context.to_string(),
            message: message.into(),
        }
    }

    fn u32_at(&self, at: usize) -> u32 {
        self.u32_of(&self.bytes[at..at + 4])
    }

    fn u32_of(&self, b: &[u8]) -> u32 {
        let b = [b[0], b[1], b[2], b[3]];
        if self.big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    fn tag(&mut self, context: &str) -> Result<Tag, MatError> {
        if self.bytes.len() - self.pos < 8 {
            return Err(self.err(context, "truncated: a data element tag is cut off"));
        }
        let first = self.u32_at(self.pos);
        // Small data element: the byte count sits in the upper half of the first word
        // (in file order), the data in the second word.
        let (ty, size, small) = if first >> 16 != 0 {
            (first & 0xffff, (first >> 16) as usize, true)
        } else {
            (first, self.u32_at(self.pos + 4) as usize, false)
        };
        if small {
            if size > 4 {
                return Err(self.err(
                    context,
                    format!("a packed element claims {size} bytes (at most 4 fit)"),
                ));
            }
            self.pos += 4;
        } else {
            self.pos += 8;
        }
        Ok(Tag { ty, size, small })
    }

    fn take(&mut self, n: usize, context: &str) -> Result<&'a [u8], MatError> {
        if self.bytes.len() - self.pos < n {
            return Err(self.err(
                context,
                format!(
                    "truncated: an element needs {n} bytes, {} are left",
                    self.bytes.len() - self.pos
                ),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Skips the padding after an element body: to 8 bytes (4 for packed elements, whose
    /// 4-byte tag plus 4-byte data slot are one 8-byte unit).
    fn align(&mut self, small: bool) {
        let unit = if small { 4 } else { 8 };
        let pad = (unit - self.pos % unit) % unit;
        self.pos = (self.pos + pad).min(self.bytes.len());
    }

    /// One sub-element: its type and raw bytes.
    fn element(&mut self, context: &str) -> Result<(u32, &'a [u8]), MatError> {
        let tag = self.tag(context)?;
        let body = self.take(tag.size, context)?;
        if tag.small {
            // The data slot of a packed element is always 4 bytes.
            self.pos = (self.pos + (4 - tag.size)).min(self.bytes.len());
        } else {
            self.align(false);
        }
        Ok((tag.ty, body))
    }

    /// Decodes a numeric sub-element to `f64`s.
    fn numbers(&self, ty: u32, body: &[u8], context: &str) -> Result<Vec<f64>, MatError> {
        let big = self.big;
        macro_rules! conv {
            ($t:ty, $n:expr) => {{
                let width: usize = $n;
                if body.len() % width != 0 {
                    return Err(self.err(
                        context,
                        format!("{} bytes do not hold whole {}-byte values", body.len(), $n),
                    ));
                }
                body.chunks_exact($n)
                    .map(|c| {
                        let mut a = [0u8; $n];
                        a.copy_from_slice(c);
                        (if big {
                            <$t>::from_be_bytes(a)
                        } else {
                            <$t>::from_le_bytes(a)
                        }) as f64
                    })
                    .collect()
            }};
        }
        Ok(match ty {
            MI_INT8 => conv!(i8, 1),
            MI_UINT8 | MI_UTF8 => conv!(u8, 1),
            MI_INT16 => conv!(i16, 2),
            MI_UINT16 | MI_UTF16 => conv!(u16, 2),
            MI_INT32 => conv!(i32, 4),
            MI_UINT32 | MI_UTF32 => conv!(u32, 4),
            MI_SINGLE => conv!(f32, 4),
            MI_DOUBLE => conv!(f64, 8),
            MI_INT64 => conv!(i64, 8),
            MI_UINT64 => conv!(u64, 8),
            other => {
                return Err(self.err(context, format!("data type {other} is not numeric")));
            }
        })
    }

    /// The body of an `miMATRIX` element (this reader spans exactly that body): its name
    /// and value. An empty body (how writers store `[]` in cells) is an empty double.
    fn matrix(
        &mut self,
        context: &str,
        depth: usize,
    ) -> Result<Option<(String, MatValue)>, MatError> {
        if self.bytes.is_empty() {
            return Ok(Some((
                String::new(),
                MatValue::Numeric {
                    dims: vec![0, 0],
                    class: MatClass::Double,
                    logical: false,
                    complex: false,
                    data: Vec::new(),
                },
            )));
        }
        if depth > MAX_DEPTH {
            return Err(self.err(context, format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let (ty, flags) = self.element(context)?;
        if ty != MI_UINT32 || flags.len() != 8 {
            return Err(self.err(context, "array flags missing"));
        }
        let word = self.u32_of(&flags[..4]);
        let class_code = word & 0xff;
        let complex = word & 0x0800 != 0;
        let logical = word & 0x0200 != 0;
        let (ty, dims_raw) = self.element(context)?;
        if ty != MI_INT32 {
            return Err(self.err(context, "dimensions missing"));
        }
        let dims: Vec<usize> = self
            .numbers(MI_INT32, dims_raw, context)?
            .into_iter()
            .map(|d| {
                if d < 0.0 {
                    Err(self.err(context, format!("negative dimension {d}")))
                } else {
                    Ok(d as usize)
                }
            })
            .collect::<Result<_, _>>()?;
        if dims.len() < 2 {
            return Err(self.err(context, format!("{} dimensions (at least 2)", dims.len())));
        }
        let count = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| self.err(context, "dimensions overflow"))?;
        let (ty, name_raw) = self.element(context)?;
        if ty != MI_INT8 && ty != MI_UINT8 && ty != MI_UTF8 {
            return Err(self.err(context, "array name missing"));
        }
        let name = String::from_utf8_lossy(name_raw).to_string();
        let here = if context.is_empty() {
            name.clone()
        } else {
            context.to_string()
        };
        let value = match class_code {
            1 => {
                // Cell: every cell is a full miMATRIX element. Each needs at least a
                // tag, so a count beyond the bytes left is rejected before allocating.
                self.fits(count, 8, &here)?;
                let mut items = Vec::with_capacity(count);
                for i in 0..count {
                    let ctx = format!("{here}{{{}}}", i + 1);
                    items.push(self.sub_matrix(&ctx, depth)?);
                }
                MatValue::Cell { dims, items }
            }
            2 => {
                let (ty, len_raw) = self.element(&here)?;
                let len = self.numbers(ty, len_raw, &here)?;
                let len = match len.as_slice() {
                    [l] if *l >= 1.0 && *l <= 4096.0 => *l as usize,
                    _ => return Err(self.err(&here, "bad field-name length")),
                };
                let (ty, names_raw) = self.element(&here)?;
                if ty != MI_INT8 && ty != MI_UINT8 && ty != MI_UTF8 {
                    return Err(self.err(&here, "field names missing"));
                }
                if names_raw.len() % len != 0 {
                    return Err(self.err(&here, "field names do not fill whole slots"));
                }
                let fields: Vec<String> = names_raw
                    .chunks_exact(len)
                    .map(|c| {
                        let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
                        String::from_utf8_lossy(&c[..end]).to_string()
                    })
                    .collect();
                let cells = count
                    .checked_mul(fields.len())
                    .ok_or_else(|| self.err(&here, "struct size overflows"))?;
                self.fits(cells, 8, &here)?;
                let mut items = Vec::with_capacity(count);
                for e in 0..count {
                    let mut row = Vec::with_capacity(fields.len());
                    for f in &fields {
                        let ctx = if count == 1 {
                            format!("{here}.{f}")
                        } else {
                            format!("{here}({}).{f}", e + 1)
                        };
                        row.push(self.sub_matrix(&ctx, depth)?);
                    }
                    items.push(row);
                }
                MatValue::Struct {
                    dims,
                    fields,
                    items,
                }
            }
            3 => return Err(self.err(&here, "MATLAB objects are not supported")),
            4 => {
                let (ty, raw) = self.element(&here)?;
                let text: Vec<char> = match ty {
                    MI_UTF8 => String::from_utf8_lossy(raw).chars().collect(),
                    MI_UINT16 | MI_UTF16 => {
                        let units: Vec<u16> = self
                            .numbers(MI_UINT16, raw, &here)?
                            .into_iter()
                            .map(|v| v as u16)
                            .collect();
                        char::decode_utf16(units)
                            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                            .collect()
                    }
                    MI_UTF32 | MI_UINT32 => self
                        .numbers(MI_UINT32, raw, &here)?
                        .into_iter()
                        .map(|v| char::from_u32(v as u32).unwrap_or(char::REPLACEMENT_CHARACTER))
                        .collect(),
                    MI_INT8 | MI_UINT8 => raw.iter().map(|&b| b as char).collect(),
                    other => {
                        return Err(self.err(&here, format!("char data of type {other}")));
                    }
                };
                if text.len() != count {
                    return Err(self.err(
                        &here,
                        format!("{} characters for dimensions {dims:?}", text.len()),
                    ));
                }
                MatValue::Char { dims, text }
            }
            5 => return Err(self.err(&here, "sparse arrays are not supported")),
            6..=15 => {
                let class = match class_code {
                    6 => MatClass::Double,
                    7 => MatClass::Single,
                    8 => MatClass::Int8,
                    9 => MatClass::Uint8,
                    10 => MatClass::Int16,
                    11 => MatClass::Uint16,
                    12 => MatClass::Int32,
                    13 => MatClass::Uint32,
                    14 => MatClass::Int64,
                    _ => MatClass::Uint64,
                };
                let (ty, raw) = self.element(&here)?;
                let data = self.numbers(ty, raw, &here)?;
                if data.len() != count {
                    return Err(self.err(
                        &here,
                        format!("{} values for dimensions {dims:?}", data.len()),
                    ));
                }
                if complex {
                    let (ty, raw) = self.element(&here)?;
                    self.numbers(ty, raw, &here)?;
                }
                MatValue::Numeric {
                    dims,
                    class,
                    logical,
                    complex,
                    data,
                }
            }
            16 => return Err(self.err(&here, "function handles are not supported")),
            other => return Err(self.err(&here, format!("unknown array class {other}"))),
        };
        Ok(Some((name, value)))
    }

    /// Checks that `count` items of at least `each` bytes can still be in this element.
    fn fits(&self, count: usize, each: usize, context: &str) -> Result<(), MatError> {
        let left = self.bytes.len() - self.pos;
        if count.saturating_mul(each) > left {
            return Err(self.err(
                context,
                format!("claims {count} items but only {left} bytes are left"),
            ));
        }
        Ok(())
    }

    /// A nested `miMATRIX` element (a cell or a struct field).
    fn sub_matrix(&mut self, context: &str, depth: usize) -> Result<MatValue, MatError> {
        let start = self.pos;
        let (ty, body) = self.element(context)?;
        if ty != MI_MATRIX {
            self.pos = start;
            return Err(self.err(context, format!("data type {ty} where an array belongs")));
        }
        let mut inner = Reader {
            bytes: body,
            pos: 0,
            big: self.big,
            base: self.base + start + 8,
        };
        let (_, value) = inner
            .matrix(context, depth + 1)?
            .ok_or_else(|| self.err(context, "empty element"))?;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian MAT-file from hand-written elements.
    fn file(elements: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![b' '; 116];
        b[..10].copy_from_slice(b"MATLAB 5.0");
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&0x0100u16.to_le_bytes());
        b.extend_from_slice(b"IM");
        for e in elements {
            b.extend_from_slice(e);
        }
        b
    }

    fn el(ty: u32, data: &[u8]) -> Vec<u8> {
        let mut b = ty.to_le_bytes().to_vec();
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(data);
        while !b.len().is_multiple_of(8) {
            b.push(0);
        }
        b
    }

    fn packed(ty: u32, data: &[u8]) -> Vec<u8> {
        let mut b = ((data.len() as u32) << 16 | ty).to_le_bytes().to_vec();
        b.extend_from_slice(data);
        b.resize(8, 0);
        b
    }

    fn matrix(class: u32, dims: &[i32], name: &str, rest: &[Vec<u8>]) -> Vec<u8> {
        let mut body = el(MI_UINT32, &[class.to_le_bytes(), [0; 4]].concat());
        let d: Vec<u8> = dims.iter().flat_map(|v| v.to_le_bytes()).collect();
        body.extend(el(MI_INT32, &d));
        body.extend(if name.len() <= 4 {
            packed(MI_INT8, name.as_bytes())
        } else {
            el(MI_INT8, name.as_bytes())
        });
        for r in rest {
            body.extend_from_slice(r);
        }
        el(MI_MATRIX, &body)
    }

    #[test]
    fn hand_made_file_with_packed_elements() {
        let x = matrix(6, &[1, 2], "x", &[packed(MI_UINT8, &[7, 9])]);
        let s = matrix(4, &[1, 2], "label", &[packed(MI_UINT16, &[104, 0, 105, 0])]);
        let bytes = file(&[x, s]);
        let f = parse(&bytes).unwrap();
        assert!(f.header.starts_with("MATLAB 5.0"));
        match f.get("x").unwrap() {
            MatValue::Numeric { data, class, .. } => {
                assert_eq!(data, &vec![7.0, 9.0]);
                assert_eq!(*class, MatClass::Double);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(f.get("label").unwrap().as_str().unwrap(), "hi");
    }

    #[test]
    fn big_endian_files_read_the_same() {
        // A hand-made big-endian file: header "MI", then x = [7 300] as uint16 in a
        // double array, and a packed char name.
        let be_el = |ty: u32, data: &[u8]| {
            let mut b = ty.to_be_bytes().to_vec();
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            while !b.len().is_multiple_of(8) {
                b.push(0);
            }
            b
        };
        let mut body = be_el(MI_UINT32, &[6u32.to_be_bytes(), [0; 4]].concat());
        body.extend(be_el(
            MI_INT32,
            &[1i32.to_be_bytes(), 2i32.to_be_bytes()].concat(),
        ));
        let mut name = (1u32 << 16 | MI_INT8).to_be_bytes().to_vec();
        name.extend_from_slice(&[b'x', 0, 0, 0]);
        body.extend(name);
        body.extend(be_el(
            MI_UINT16,
            &[7u16.to_be_bytes(), 300u16.to_be_bytes()].concat(),
        ));
        let mut bytes = vec![b' '; 116];
        bytes.extend_from_slice(&[0; 8]);
        bytes.extend_from_slice(&0x0100u16.to_be_bytes());
        bytes.extend_from_slice(b"MI");
        bytes.extend(be_el(MI_MATRIX, &body));
        let f = parse(&bytes).unwrap();
        match f.get("x").unwrap() {
            MatValue::Numeric { data, dims, .. } => {
                assert_eq!(data, &vec![7.0, 300.0]);
                assert_eq!(dims, &vec![1, 2]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn damaged_files_are_errors_naming_the_place() {
        let x = matrix(6, &[1, 3], "x", &[packed(MI_UINT8, &[7, 9])]);
        let e = parse(&file(&[x])).unwrap_err();
        assert_eq!(e.context, "x");
        assert!(e.message.contains("2 values for dimensions [1, 3]"), "{e}");
        assert!(parse(b"MATLAB 5.0").is_err());
        let mut v73 = file(&[]);
        v73[..10].copy_from_slice(b"MATLAB 7.3");
        assert!(parse(&v73).unwrap_err().message.contains("HDF5"));
        // A cell that claims more cells than there are bytes: rejected before allocating.
        let cell = matrix(1, &[1_000_000, 1_000_000], "c", &[]);
        let e = parse(&file(&[cell])).unwrap_err();
        assert!(e.message.contains("only"), "{e}");
        // Truncation anywhere: an error, never a panic.
        let whole = file(&[matrix(
            2,
            &[1, 1],
            "s",
            &[
                packed(MI_INT32, &4i32.to_le_bytes()),
                el(MI_INT8, b"abc\0"),
                matrix(6, &[1, 1], "", &[el(MI_DOUBLE, &2.5f64.to_le_bytes())]),
            ],
        )]);
        assert_eq!(
            parse(&whole)
                .unwrap()
                .get("s")
                .unwrap()
                .field(0, "abc")
                .unwrap()
                .as_scalar(),
            Some(2.5)
        );
        for cut in 128..whole.len() {
            let _ = parse(&whole[..cut]);
        }
    }
}
