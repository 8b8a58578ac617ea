//! GGUF metadata keys and tensor names, as llama.cpp defines them
//! (`gguf-py/gguf/constants.py`, `src/llama-arch.cpp`). Keys of the form
//! `{arch}.…` are templates: fill them with [`arch_key`].

/// Fills the `{arch}` of a key template (`arch_key(llm::BLOCK_COUNT, "qwen2")`
/// is `qwen2.block_count`).
pub fn arch_key(template: &str, arch: &str) -> String {
    template.replace("{arch}", arch)
}

pub mod general {
    pub const ARCHITECTURE: &str = "general.architecture";
    pub const QUANTIZATION_VERSION: &str = "general.quantization_version";
    pub const ALIGNMENT: &str = "general.alignment";
    pub const FILE_TYPE: &str = "general.file_type";
    pub const TYPE: &str = "general.type";
    pub const NAME: &str = "general.name";
    pub const BASENAME: &str = "general.basename";
    pub const FINETUNE: &str = "general.finetune";
    pub const SIZE_LABEL: &str = "general.size_label";
    pub const LICENSE: &str = "general.license";
}

pub mod llm {
    pub const VOCAB_SIZE: &str = "{arch}.vocab_size";
    pub const CONTEXT_LENGTH: &str = "{arch}.context_length";
    pub const EMBEDDING_LENGTH: &str = "{arch}.embedding_length";
    pub const BLOCK_COUNT: &str = "{arch}.block_count";
    pub const FEED_FORWARD_LENGTH: &str = "{arch}.feed_forward_length";
}

pub mod attention {
    pub const HEAD_COUNT: &str = "{arch}.attention.head_count";
    pub const HEAD_COUNT_KV: &str = "{arch}.attention.head_count_kv";
    pub const KEY_LENGTH: &str = "{arch}.attention.key_length";
    pub const VALUE_LENGTH: &str = "{arch}.attention.value_length";
    pub const LAYERNORM_RMS_EPS: &str = "{arch}.attention.layer_norm_rms_epsilon";
    pub const SLIDING_WINDOW: &str = "{arch}.attention.sliding_window";
}

pub mod rope {
    pub const DIMENSION_COUNT: &str = "{arch}.rope.dimension_count";
    pub const FREQ_BASE: &str = "{arch}.rope.freq_base";
    pub const SCALING_TYPE: &str = "{arch}.rope.scaling.type";
    pub const SCALING_FACTOR: &str = "{arch}.rope.scaling.factor";
    pub const SCALING_ORIG_CTX_LEN: &str = "{arch}.rope.scaling.original_context_length";
    pub const SCALING_YARN_BETA_FAST: &str = "{arch}.rope.scaling.yarn_beta_fast";
    pub const SCALING_YARN_BETA_SLOW: &str = "{arch}.rope.scaling.yarn_beta_slow";
}

pub mod tokenizer {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const SCORES: &str = "tokenizer.ggml.scores";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    pub const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
    pub const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
    pub const SEP_ID: &str = "tokenizer.ggml.seperator_token_id";
    pub const PAD_ID: &str = "tokenizer.ggml.padding_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    pub const FIM_PRE_ID: &str = "tokenizer.ggml.fim_pre_token_id";
    pub const FIM_SUF_ID: &str = "tokenizer.ggml.fim_suf_token_id";
    pub const FIM_MID_ID: &str = "tokenizer.ggml.fim_mid_token_id";
    pub const FIM_PAD_ID: &str = "tokenizer.ggml.fim_pad_token_id";
    pub const FIM_REP_ID: &str = "tokenizer.ggml.fim_rep_token_id";
    pub const FIM_SEP_ID: &str = "tokenizer.ggml.fim_sep_token_id";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// `general.file_type` values (llama.cpp's `llama_ftype`).
pub mod file_type {
    pub const ALL_F32: u32 = 0;
    pub const MOSTLY_F16: u32 = 1;
    pub const MOSTLY_Q4_0: u32 = 2;
    pub const MOSTLY_Q4_1: u32 = 3;
    pub const MOSTLY_Q8_0: u32 = 7;
    pub const MOSTLY_Q4_K_M: u32 = 15;
    pub const MOSTLY_BF16: u32 = 32;
}

/// The quantization format version llama.cpp writes (`GGML_QNT_VERSION`).
pub const QUANTIZATION_VERSION: u32 = 2;

/// Tensor names of the llama-family decoders (`LLM_TENSOR_NAMES` in
/// llama-arch.cpp), with the HF name of the same weight. `{i}` is the layer.
pub mod tensors {
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    pub const OUTPUT_NORM: &str = "output_norm.weight";
    pub const OUTPUT: &str = "output.weight";

    /// (GGUF name, HF name) of the tensors outside the layers.
    pub const GLOBAL: &[(&str, &str)] = &[
        (TOKEN_EMBD, "model.embed_tokens.weight"),
        (OUTPUT_NORM, "model.norm.weight"),
        (OUTPUT, "lm_head.weight"),
    ];

    /// (GGUF suffix, HF suffix) of the tensors of layer i: `blk.{i}.{gguf}` ⇄
    /// `model.layers.{i}.{hf}`.
    pub const LAYER: &[(&str, &str)] = &[
        ("attn_norm.weight", "input_layernorm.weight"),
        ("attn_q.weight", "self_attn.q_proj.weight"),
        ("attn_q.bias", "self_attn.q_proj.bias"),
        ("attn_k.weight", "self_attn.k_proj.weight"),
        ("attn_k.bias", "self_attn.k_proj.bias"),
        ("attn_v.weight", "self_attn.v_proj.weight"),
        ("attn_v.bias", "self_attn.v_proj.bias"),
        ("attn_output.weight", "self_attn.o_proj.weight"),
        ("attn_output.bias", "self_attn.o_proj.bias"),
        ("attn_q_norm.weight", "self_attn.q_norm.weight"),
        ("attn_k_norm.weight", "self_attn.k_norm.weight"),
        ("ffn_norm.weight", "post_attention_layernorm.weight"),
        ("ffn_gate.weight", "mlp.gate_proj.weight"),
        ("ffn_up.weight", "mlp.up_proj.weight"),
        ("ffn_down.weight", "mlp.down_proj.weight"),
    ];

    pub const LAYER_GGUF_PREFIX: &str = "blk.";
    pub const LAYER_HF_PREFIX: &str = "model.layers.";
}
