//! A1111's `tokenize_line` (`modules/sd_hijack_clip.py`): a prompt's
//! fragments, each tokenized without special tokens, laid out in chunks of
//! 75 tokens. When a chunk is full and the last comma is at most
//! `comma_backtrack` tokens back, the tokens after it move to the next
//! chunk; `BREAK` closes the current chunk (even an empty one). Each chunk
//! is padded with the end token to 75 and wrapped in the start and end
//! tokens (77); after a chunk's first end token the pad token follows
//! (SD 2's tokenizer pads with another token than it ends with). Every
//! token carries its fragment's weight; the start, end and padding, 1.

/// The tokens that shape chunks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Vocab {
    pub bos: i64,
    pub eos: i64,
    pub pad: i64,
    /// `,</w>`, when the vocabulary has it.
    pub comma: Option<i64>,
}

/// One chunk: 77 token ids and a weight for each.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub ids: Vec<i64>,
    pub weights: Vec<f64>,
}

/// A textual-inversion embedding's `j`-th vector of embedding `index` as
/// a token: a negative id (no vocabulary has one). A run of them, `j` from
/// 0, is one embedding: it never straddles chunks, as A1111 lays them out.
pub const fn placeholder(index: usize, j: usize) -> i64 {
    -(1 + (index as i64) * MAX_VECTORS as i64 + j as i64)
}

/// The (embedding, vector) a [`placeholder`] stands for; None for a token.
pub const fn placeholder_parts(id: i64) -> Option<(usize, usize)> {
    if id >= 0 {
        return None;
    }
    let v = (-id - 1) as usize;
    Some((v / MAX_VECTORS, v % MAX_VECTORS))
}

/// Most vectors one embedding may have (A1111's are ≤ 75: one chunk).
pub const MAX_VECTORS: usize = 1024;

/// Tokens per chunk between the start and end tokens.
pub const CHUNK_LENGTH: usize = 75;
/// A1111's `comma_padding_backtrack` default.
pub const COMMA_BACKTRACK: usize = 20;

struct Builder {
    vocab: Vocab,
    chunks: Vec<Chunk>,
    ids: Vec<i64>,
    weights: Vec<f64>,
    last_comma: Option<usize>,
}

impl Builder {
    /// Close the current chunk: pad, wrap, start the next.
    fn next_chunk(&mut self) {
        let v = self.vocab;
        let mut ids = Vec::with_capacity(CHUNK_LENGTH + 2);
        ids.push(v.bos);
        ids.append(&mut self.ids);
        let mut weights = Vec::with_capacity(CHUNK_LENGTH + 2);
        weights.push(1.0);
        weights.append(&mut self.weights);
        while ids.len() < CHUNK_LENGTH + 1 {
            ids.push(v.eos);
            weights.push(1.0);
        }
        ids.push(v.eos);
        weights.push(1.0);
        // After the first end token, the pad token.
        if let Some(end) = ids.iter().position(|&t| t == v.eos) {
            for t in &mut ids[end + 1..] {
                *t = v.pad;
            }
        }
        self.chunks.push(Chunk { ids, weights });
        self.last_comma = None;
    }

    fn push(&mut self, token: i64, weight: f64, backtrack: usize) {
        self.make_room(token, backtrack);
        self.ids.push(token);
        self.weights.push(weight);
    }

    /// An embedding's `n` vectors at `weight`: in the next chunk when they
    /// do not fit in this one.
    fn push_embedding(&mut self, first: i64, n: usize, weight: f64, backtrack: usize) {
        self.make_room(first, backtrack);
        if self.ids.len() + n > CHUNK_LENGTH {
            self.next_chunk();
        }
        for j in 0..n as i64 {
            self.ids.push(first - j);
            self.weights.push(weight);
        }
    }

    /// Before `token`: the comma backtrack, and a new chunk when this one
    /// is full.
    fn make_room(&mut self, token: i64, backtrack: usize) {
        if Some(token) == self.vocab.comma {
            self.last_comma = Some(self.ids.len());
        } else if let Some(comma) = self.last_comma {
            if backtrack != 0
                && self.ids.len() == CHUNK_LENGTH
                && self.ids.len() - comma <= backtrack
            {
                let at = comma + 1;
                let moved_ids = self.ids.split_off(at);
                let moved_weights = self.weights.split_off(at);
                self.next_chunk();
                self.ids = moved_ids;
                self.weights = moved_weights;
            }
        }
        if self.ids.len() == CHUNK_LENGTH {
            self.next_chunk();
        }
    }
}

/// Lay out `fragments` — (tokens, weight), a `BREAK` as `None` — in chunks.
pub fn chunks(
    fragments: &[Option<(Vec<i64>, f64)>],
    vocab: Vocab,
    comma_backtrack: usize,
) -> Vec<Chunk> {
    let mut b = Builder {
        vocab,
        chunks: Vec::new(),
        ids: Vec::new(),
        weights: Vec::new(),
        last_comma: None,
    };
    for f in fragments {
        match f {
            None => b.next_chunk(),
            Some((tokens, weight)) => {
                let mut i = 0;
                while i < tokens.len() {
                    let t = tokens[i];
                    if placeholder_parts(t).is_some_and(|(_, j)| j == 0) {
                        // The run of this embedding's vectors, j = 0, 1, …
                        let n = 1 + tokens[i + 1..]
                            .iter()
                            .zip(1..)
                            .take_while(|(&u, j)| u == t - j)
                            .count();
                        b.push_embedding(t, n, *weight, comma_backtrack);
                        i += n;
                    } else {
                        b.push(t, *weight, comma_backtrack);
                        i += 1;
                    }
                }
            }
        }
    }
    if !b.ids.is_empty() || b.chunks.is_empty() {
        b.next_chunk();
    }
    b.chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_embedding_never_straddles_chunks() {
        let emb: Vec<i64> = (0..4).map(|j| placeholder(2, j)).collect();
        assert_eq!(placeholder_parts(emb[3]), Some((2, 3)));
        let mut tokens = vec![5; 73];
        tokens.extend(&emb);
        let c = chunks(&[frag(&tokens, 1.0)], V, 0);
        assert_eq!(c.len(), 2);
        assert_eq!(&c[0].ids[73..75], &[5, 1001]);
        assert_eq!(&c[1].ids[1..5], &emb[..]);
        // Two in a row are two embeddings.
        let twice: Vec<i64> = emb.iter().chain(&emb).copied().collect();
        let c = chunks(&[frag(&twice, 1.2)], V, 0);
        assert_eq!(&c[0].ids[1..9], &twice[..]);
        assert_eq!(c[0].weights[8], 1.2);
    }

    const V: Vocab = Vocab {
        bos: 1000,
        eos: 1001,
        pad: 1001,
        comma: Some(9),
    };

    fn frag(tokens: &[i64], w: f64) -> Option<(Vec<i64>, f64)> {
        Some((tokens.to_vec(), w))
    }

    #[test]
    fn a_short_prompt_is_one_chunk_wrapped_and_padded() {
        let c = chunks(&[frag(&[5, 6], 1.0), frag(&[7], 1.1)], V, COMMA_BACKTRACK);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].ids.len(), 77);
        assert_eq!(&c[0].ids[..5], &[1000, 5, 6, 7, 1001]);
        assert!(c[0].ids[4..].iter().all(|&t| t == 1001));
        assert_eq!(&c[0].weights[..5], &[1.0, 1.0, 1.0, 1.1, 1.0]);
        // An empty prompt: one chunk of start, end, padding.
        let e = chunks(&[frag(&[], 1.0)], V, COMMA_BACKTRACK);
        assert_eq!(e.len(), 1);
        assert_eq!(&e[0].ids[..2], &[1000, 1001]);
    }

    #[test]
    fn sd2_pads_after_the_first_end_token() {
        let v = Vocab { pad: 0, ..V };
        let c = chunks(&[frag(&[5], 1.0)], v, COMMA_BACKTRACK);
        assert_eq!(&c[0].ids[..4], &[1000, 5, 1001, 0]);
        assert_eq!(c[0].ids[76], 0);
    }

    #[test]
    fn long_prompts_continue_in_new_chunks_and_break_closes_one() {
        let tokens: Vec<i64> = (0..80).map(|i| 100 + i).collect();
        let c = chunks(&[frag(&tokens, 1.0)], V, COMMA_BACKTRACK);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].ids[75], 174);
        assert_eq!(&c[1].ids[..7], &[1000, 175, 176, 177, 178, 179, 1001]);
        // BREAK closes the chunk, even an empty one.
        let c = chunks(
            &[frag(&[5], 1.0), None, frag(&[6], 1.0)],
            V,
            COMMA_BACKTRACK,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(&c[1].ids[..3], &[1000, 6, 1001]);
        let c = chunks(&[None, frag(&[6], 1.0)], V, COMMA_BACKTRACK);
        assert_eq!(c.len(), 2);
        assert_eq!(&c[0].ids[..2], &[1000, 1001]);
    }

    #[test]
    fn a_full_chunk_moves_the_words_after_a_near_comma_along() {
        // 70 tokens, a comma, 10 more: the chunk fills at 75 with the comma
        // 5 back, so the 4 tokens after it move to the next chunk.
        let mut tokens: Vec<i64> = (0..70).map(|i| 100 + i).collect();
        tokens.push(9);
        tokens.extend((0..10).map(|i| 500 + i));
        let c = chunks(&[frag(&tokens, 1.2)], V, COMMA_BACKTRACK);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].ids[71], 9, "the comma ends the first chunk");
        assert_eq!(c[0].ids[72], 1001);
        assert_eq!(&c[1].ids[1..11], &(500..510).collect::<Vec<i64>>()[..]);
        assert_eq!(c[1].weights[1], 1.2);
        // A comma further back than the backtrack: no move.
        let c = chunks(&[frag(&tokens, 1.0)], V, 2);
        assert_eq!(c[0].ids[75], 503);
    }
}
