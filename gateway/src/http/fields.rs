//! Reading request fields by name, so that a wrong one is a 400 naming it:
//! JSON bodies (AUTOMATIC1111's pydantic models coerce numeric strings, and
//! so does this) and multipart forms (whose fields are all text). `null`
//! is the same as absent; unknown fields are left alone.

use serde_json::{Map, Value};

use super::error::{HttpError, HttpResult};

pub struct Fields<'a>(pub &'a Map<String, Value>);

impl<'a> Fields<'a> {
    /// The field's value, unless absent or null.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn str(&self, name: &str) -> HttpResult<Option<&'a str>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong(name, "a string", v)),
        }
    }

    pub fn string_or(&self, name: &str, default: &str) -> HttpResult<String> {
        Ok(self.str(name)?.unwrap_or(default).to_string())
    }

    /// A number (or a numeric string).
    pub fn f64(&self, name: &str) -> HttpResult<Option<f64>> {
        let v = match self.get(name) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n = match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        match n {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(wrong(name, "a number", v)),
        }
    }

    /// A whole number (or a numeric string of one).
    pub fn i64(&self, name: &str) -> HttpResult<Option<i64>> {
        let Some(x) = self.f64(name)? else {
            return Ok(None);
        };
        if x.fract() != 0.0 || x.abs() > 9.0e15 {
            return Err(HttpError::invalid(
                name,
                format_args!("{x} is not a whole number"),
            ));
        }
        Ok(Some(x as i64))
    }

    /// A whole number in `lo..=hi`.
    pub fn int_in(&self, name: &str, lo: i64, hi: i64) -> HttpResult<Option<i64>> {
        match self.i64(name)? {
            Some(x) if x < lo || x > hi => Err(HttpError::invalid(
                name,
                format_args!("{x} is outside {lo}..={hi}"),
            )),
            x => Ok(x),
        }
    }

    pub fn bool(&self, name: &str) -> HttpResult<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s == "true" || s == "false" => Ok(Some(s == "true")),
            Some(v) => Err(wrong(name, "true or false", v)),
        }
    }

    /// A list of strings.
    pub fn strings(&self, name: &str) -> HttpResult<Vec<&'a str>> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    v => Err(wrong(name, "a list of strings", v)),
                })
                .collect(),
            Some(v) => Err(wrong(name, "a list of strings", v)),
        }
    }

    /// An object.
    /// LoRA adapters: an array of `{"name": …, "scale": …}` (scale 1
    /// when unsaid).
    pub fn loras(&self, name: &str) -> HttpResult<Vec<sd_proto::v1::LoraRef>> {
        let items = match self.get(name) {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(a)) => a,
            Some(_) => {
                return Err(HttpError::invalid(
                    name,
                    "expected an array of {\"name\": …, \"scale\": …}",
                ))
            }
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let bad = |what: &str| HttpError::invalid(name, format_args!("item {i}: {what}"));
                let o = v
                    .as_object()
                    .ok_or_else(|| bad("expected {\"name\": …, \"scale\": …}"))?;
                let n = o
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("`name` must be a string"))?;
                let scale = match o.get("scale") {
                    None | Some(Value::Null) => 1.0,
                    Some(v) => v.as_f64().ok_or_else(|| bad("`scale` must be a number"))?,
                };
                let unet_scale = match o.get("unet_scale") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(
                        v.as_f64()
                            .ok_or_else(|| bad("`unet_scale` must be a number"))?,
                    ),
                };
                Ok(sd_proto::v1::LoraRef {
                    name: n.to_string(),
                    scale: scale as f32,
                    unet_scale: unet_scale.map(|u| u as f32),
                })
            })
            .collect()
    }

    /// Field `name`'s array of unit objects (absent: none), each read by
    /// `read` with its own fields, its path (`name[i]`) and its `image`
    /// (base64 or a `data:` URL; empty when absent); `(many, one)` say
    /// what the array and a unit are in errors.
    fn units<T>(
        &self,
        name: &str,
        (many, one): (&str, &str),
        read: impl Fn(&Fields, &str, Vec<u8>) -> HttpResult<T>,
    ) -> HttpResult<Vec<T>> {
        let items = match self.get(name) {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(a)) => a,
            Some(v) => return Err(wrong(name, many, v)),
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let at = format!("{name}[{i}]");
                let o = v.as_object().ok_or_else(|| wrong(&at, one, v))?;
                let f = Fields(o);
                let image = f.str("image").map_err(|e| e.within(&at))?.unwrap_or("");
                let image = if image.is_empty() {
                    Vec::new()
                } else {
                    super::decode_base64(&format!("{at}.image"), image)?
                };
                read(&f, &at, image)
            })
            .collect()
    }

    /// A number as f32 (absent: None), its error named within `at`.
    fn f32_within(&self, key: &str, at: &str) -> HttpResult<Option<f32>> {
        Ok(self.f64(key).map_err(|e| e.within(at))?.map(|v| v as f32))
    }

    /// ControlNet units (the gRPC `controlnets` as JSON): an array of
    /// `{"name", "image" (base64 or a data URL), "weight", "start", "end",
    /// "mode" (balanced, prompt, control), "preprocessor" (none, canny),
    /// "threshold_a", "threshold_b", "processor_res", "resize_mode"
    /// (just_resize, crop_and_resize, resize_and_fill), "union_mode" (a
    /// union ControlNet's control type)}`.
    pub fn controlnets(&self, name: &str) -> HttpResult<Vec<sd_proto::v1::ControlUnit>> {
        let what = ("an array of ControlNet units", "a ControlNet unit object");
        self.units(name, what, |f, at, image| {
            let within = |e: HttpError| e.within(at);
            let choice = |key: &str, options: &[&str]| -> HttpResult<i32> {
                match f.str(key).map_err(within)? {
                    None => Ok(0),
                    Some(v) => options
                        .iter()
                        .position(|o| *o == v)
                        .map(|p| p as i32)
                        .ok_or_else(|| {
                            HttpError::invalid(
                                format!("{at}.{key}"),
                                format_args!("`{v}`: expected {}", options.join(", ")),
                            )
                        }),
                }
            };
            Ok(sd_proto::v1::ControlUnit {
                name: f.string_or("name", "").map_err(within)?,
                image: image.into(),
                weight: f.f32_within("weight", at)?,
                start: f.f32_within("start", at)?,
                end: f.f32_within("end", at)?,
                mode: choice("mode", &["balanced", "prompt", "control"])?,
                preprocessor: f.string_or("preprocessor", "").map_err(within)?,
                threshold_a: f.f32_within("threshold_a", at)?,
                threshold_b: f.f32_within("threshold_b", at)?,
                processor_res: f
                    .int_in("processor_res", 0, 4096)
                    .map_err(within)?
                    .unwrap_or(0) as u32,
                resize_mode: choice(
                    "resize_mode",
                    &["just_resize", "crop_and_resize", "resize_and_fill"],
                )?,
                union_mode: f
                    .int_in("union_mode", 0, 255)
                    .map_err(within)?
                    .map(|m| m as u32),
                ..Default::default()
            })
        })
    }

    /// IP-Adapters (the gRPC `ip_adapters` as JSON): an array of `{"name",
    /// "image" (base64 or a data URL), "scale", "start", "end"}`.
    pub fn ip_adapters(&self, name: &str) -> HttpResult<Vec<sd_proto::v1::IpAdapterUnit>> {
        let what = ("an array of IP-Adapter units", "an IP-Adapter unit object");
        self.units(name, what, |f, at, image| {
            Ok(sd_proto::v1::IpAdapterUnit {
                name: f.string_or("name", "").map_err(|e| e.within(at))?,
                image: image.into(),
                scale: f.f32_within("scale", at)?,
                start: f.f32_within("start", at)?,
                end: f.f32_within("end", at)?,
                ..Default::default()
            })
        })
    }

    pub fn object(&self, name: &str) -> HttpResult<Option<&'a Map<String, Value>>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(wrong(name, "an object", v)),
        }
    }
}

fn wrong(name: &str, expected: &str, got: &Value) -> HttpError {
    let what = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    HttpError::invalid(name, format_args!("expected {expected}, got {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn fields_by_type_naming_the_wrong_one() {
        let m = with(json!({
            "prompt": "a cat", "steps": 20, "cfg": "7.5", "n": "3", "seed": -1,
            "frac": 2.5, "flag": true, "none": null, "list": ["a", "b"], "bad": {"x": 1}
        }));
        let f = Fields(&m);
        assert_eq!(f.str("prompt").unwrap(), Some("a cat"));
        assert_eq!(f.i64("steps").unwrap(), Some(20));
        assert_eq!(f.f64("cfg").unwrap(), Some(7.5));
        assert_eq!(f.i64("n").unwrap(), Some(3));
        assert_eq!(f.i64("seed").unwrap(), Some(-1));
        assert_eq!(f.bool("flag").unwrap(), Some(true));
        assert_eq!(f.str("none").unwrap(), None);
        assert_eq!(f.str("absent").unwrap(), None);
        assert_eq!(f.strings("list").unwrap(), vec!["a", "b"]);
        for (name, e) in [
            ("steps", f.str("steps").unwrap_err()),
            ("frac", f.i64("frac").unwrap_err()),
            ("prompt", f.f64("prompt").unwrap_err()),
            ("bad", f.strings("bad").unwrap_err()),
            ("steps", f.int_in("steps", 1, 10).unwrap_err()),
        ] {
            assert_eq!(e.param.as_deref(), Some(name));
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
    }
}
