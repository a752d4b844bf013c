//! The protobuf codec every sd.v1 client and server uses: prost's, except
//! that a message that does not decode (truncated, a string that is not
//! UTF-8) is INVALID_ARGUMENT with a short message and the UNDECODABLE
//! reason, not INTERNAL — the sender's mistake, not ours.
//!
//! The generated clients use the same codec: a reply that does not decode
//! carries the same reason, by which the gateway tells a model service's
//! bad reply (INTERNAL to its client) from a client's bad request.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

#[derive(Debug, Clone)]
pub struct SdCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SdCodec<T, U> {
    fn default() -> Self {
        SdCodec(PhantomData)
    }
}

impl<T, U> Codec for SdCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(ProstDecoder::new(BufferSettings::default()))
    }
}

/// prost's decoder with decode errors as INVALID_ARGUMENT.
#[derive(Debug)]
pub struct CheckedDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // prost's message names the field; `undecodable` cuts it short.
        self.0
            .decode(buf)
            .map_err(|s| crate::status::undecodable(s.message()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Message bodies as they are, both ways: for tools and tests that send
/// what no generated client would (a truncated message, a string that is
/// not UTF-8) or serve replies no generated server would.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
