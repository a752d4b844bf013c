//! The end of a generation: the final latents through the VAE decoder, the
//! pixels encoded as the client asked; and previews on the way.

use std::time::Instant;

use sd_proto::v1::{
    DecodeRequest, Dtype, GeneratedImage, GenerationParameters, ImageFormat, PreviewMode,
};
use sd_proto::wire::HostTensor;
use sd_runtime::deadline::Deadline;
use sd_runtime::metrics::Phase;
use tracing::Instrument;

use super::Generator;
use crate::blocking::{off_thread, INLINE_PIXELS};
use crate::error::{Error, Result, Stage};
use crate::images;

/// Decoded pixels of one image: RGB8, row-major.
pub(super) struct Pixels {
    pub rgb: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

impl Pixels {
    fn small(&self) -> bool {
        self.width as u64 * self.height as u64 <= INLINE_PIXELS
    }
}

impl Generator {
    /// The images `latents` decode to (one per image, checked).
    pub(super) async fn decode(
        &self,
        latents: HostTensor,
        num_images: u32,
        deadline: &Deadline,
    ) -> Result<Vec<Pixels>> {
        let started = Instant::now();
        let pixels = self.decode_latents(&latents, deadline).await?;
        if pixels.len() != num_images as usize {
            return Err(Error::bad_reply(
                Stage::Autoencoder,
                format!("{} images for {num_images}", pixels.len()),
            ));
        }
        self.metrics.step(Phase::Decode, started.elapsed());
        Ok(pixels)
    }

    /// Decode in as many calls as the autoencoder's pixel bound needs
    /// (images in order).
    async fn decode_latents(
        &self,
        latents: &HostTensor,
        deadline: &Deadline,
    ) -> Result<Vec<Pixels>> {
        let per_call = images_per_call(
            &latents.shape,
            self.facts.layout.scale_factor,
            self.facts.max_decode_pixels,
        );
        if per_call >= batch_of(&latents.shape) {
            return self.decode_call(latents, deadline).await;
        }
        let mut pixels = Vec::new();
        for chunk in batch_chunks(latents, per_call) {
            pixels.extend(self.decode_call(&chunk, deadline).await?);
        }
        Ok(pixels)
    }

    async fn decode_call(&self, latents: &HostTensor, deadline: &Deadline) -> Result<Vec<Pixels>> {
        let request = DecodeRequest {
            latents: Some(latents.to_wire(Dtype::Float32)),
        };
        let span = tracing::info_span!("decode", replica = tracing::field::Empty);
        let response = self
            .stages
            .decode(request, deadline)
            .instrument(span)
            .await?;
        response
            .images
            .into_iter()
            .map(|i| {
                let want = i.width as usize * i.height as usize * 3;
                if i.rgb.len() != want {
                    return Err(Error::bad_reply(
                        Stage::Autoencoder,
                        format!(
                            "{} bytes for a {}×{} RGB image",
                            i.rgb.len(),
                            i.width,
                            i.height
                        ),
                    ));
                }
                Ok(Pixels {
                    rgb: i.rgb.to_vec(),
                    width: i.width,
                    height: i.height,
                })
            })
            .collect()
    }

    /// The result images in `format`, with the parameters as metadata.
    pub(super) async fn encode_images(
        &self,
        decoded: Vec<Pixels>,
        format: ImageFormat,
        parameters: &GenerationParameters,
    ) -> Result<Vec<GeneratedImage>> {
        let started = Instant::now();
        let mut images = Vec::with_capacity(decoded.len());
        for p in decoded {
            let params = parameters.clone();
            let (width, height) = (p.width, p.height);
            let data = off_thread(p.small(), move || {
                images::encode(&p.rgb, p.width, p.height, format, &params)
            })
            .await?;
            images.push(GeneratedImage {
                data: data.into(),
                format: format as i32,
                width,
                height,
            });
        }
        self.metrics.step(Phase::ImageEncode, started.elapsed());
        Ok(images)
    }

    /// Previews of `latents`: a cheap projection at latent resolution, or
    /// the decoded images.
    pub(super) async fn preview(
        &self,
        mode: PreviewMode,
        latents: HostTensor,
        deadline: &Deadline,
    ) -> Result<Vec<GeneratedImage>> {
        match mode {
            PreviewMode::Latent => latent_previews(&latents),
            PreviewMode::Full => {
                let mut out = Vec::new();
                for p in self.decode_latents(&latents, deadline).await? {
                    let (width, height) = (p.width, p.height);
                    let data = off_thread(p.small(), move || {
                        images::encode_png(&p.rgb, p.width, p.height, &[])
                    })
                    .await?;
                    out.push(GeneratedImage {
                        data: data.into(),
                        format: ImageFormat::Png as i32,
                        width,
                        height,
                    });
                }
                Ok(out)
            }
        }
    }
}

/// One latent preview per image of `latents` (images, channels, h, w).
fn latent_previews(latents: &HostTensor) -> Result<Vec<GeneratedImage>> {
    let [n, c, h, w] = <[i64; 4]>::try_from(latents.shape.as_slice())
        .map_err(|_| Error::Internal("latents are not 4-d".into()))?
        .map(|d| d as usize);
    let per = c * h * w;
    (0..n)
        .map(|i| {
            let data = images::latent_preview(&latents.data[i * per..(i + 1) * per], c, h, w)?;
            Ok(GeneratedImage {
                data: data.into(),
                format: ImageFormat::Png as i32,
                width: w as u32,
                height: h as u32,
            })
        })
        .collect()
}

/// Images in a (batch, …) tensor's shape (at least one).
fn batch_of(shape: &[i64]) -> usize {
    shape.first().copied().unwrap_or(1).max(1) as usize
}

/// Images of latents `shape` (batch, c, h, w) one Decode may carry within
/// `max_pixels` (0: all of them; at least one).
fn images_per_call(shape: &[i64], scale_factor: u32, max_pixels: u64) -> usize {
    let batch = batch_of(shape);
    let side =
        |i: usize| shape.get(i).copied().unwrap_or(1).max(1) as u64 * u64::from(scale_factor);
    let per_image = side(2) * side(3);
    if max_pixels == 0 {
        return batch;
    }
    ((max_pixels / per_image.max(1)) as usize).clamp(1, batch)
}

/// `t` split along its first axis into tensors of at most `n` items.
fn batch_chunks(t: &HostTensor, n: usize) -> Vec<HostTensor> {
    let per_item = (t.data.len() / batch_of(&t.shape)).max(1);
    t.data
        .chunks(per_item * n)
        .map(|d| {
            let mut shape = t.shape.clone();
            shape[0] = (d.len() / per_item) as i64;
            HostTensor {
                shape,
                data: d.to_vec(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_split_to_the_autoencoders_pixel_bound() {
        // 5 images of 64×64 latents (512² pixels): 262,144 pixels each.
        let shape = [5, 4, 64, 64];
        assert_eq!(images_per_call(&shape, 8, 0), 5, "no bound published");
        assert_eq!(images_per_call(&shape, 8, 2048 * 2048), 5);
        assert_eq!(images_per_call(&shape, 8, 3 * 262_144 + 1), 3);
        assert_eq!(images_per_call(&shape, 8, 1000), 1, "at least one");
        let t = HostTensor {
            shape: vec![5, 1, 1, 2],
            data: (0..10).map(|i| i as f32).collect(),
        };
        let chunks = batch_chunks(&t, 2);
        let shapes: Vec<_> = chunks.iter().map(|c| c.shape[0]).collect();
        assert_eq!(shapes, vec![2, 2, 1]);
        assert_eq!(chunks[2].data, vec![8.0, 9.0]);
        let whole: Vec<f32> = chunks.into_iter().flat_map(|c| c.data).collect();
        assert_eq!(whole, t.data);
    }
}
