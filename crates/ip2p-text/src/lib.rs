//! ip2p-text: CLIP's tokenizer and text encoder, as Stable Diffusion / InstructPix2Pix use them.
//!
//! - [`ClipTokenizer`]: a diffusers `tokenizer/` folder (`vocab.json` + `merges.txt`, or
//!   `tokenizer.json`) → ids padded and truncated to `model_max_length`, equal to
//!   transformers' `CLIPTokenizer`; and ids back to a prompt for logging.
//! - [`ClipTextModel`]: transformers' `CLIPTextModel` from `text_encoder/` → `last_hidden_state`
//!   `[batch, 77, hidden]`.
//! - [`PromptEncoder`]: both together; prompts or dataset token ids in, with the unconditional
//!   embedding cached and repeated rows encoded once.

pub mod conditioner;
pub mod encoder;
pub mod error;
pub mod tokenizer;

pub use conditioner::{EncodeStats, PromptEncoder};
pub use encoder::{ClipTextConfig, ClipTextModel, HiddenAct, weight_spec};
pub use error::TextError;
pub use tokenizer::{ClipTokenizer, DEFAULT_MAX_LENGTH, Tokens, check_ids};
