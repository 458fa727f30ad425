/*
 * How a C or C++ engine links kvsieve: load a config, check the ABI, plan a compression event
 * for a few sequences and print what would be released. Every status is checked.
 *
 *   cc -std=c11 -Wall -Wextra -Werror -I include integrations/c/example.c \
 *      -L target/release -lkvsieve -o kvsieve-example
 *   LD_LIBRARY_PATH=target/release ./kvsieve-example [config.toml]
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvsieve.h"

/* Print the failing call, its status name and kvsieve's message, then leave. */
#define CHECK(call)                                                                  \
  do {                                                                               \
    kvs_status st_ = (call);                                                         \
    if (st_ != KVS_STATUS_OK) {                                                      \
      fprintf(stderr, "%s failed: %s: %s\n", #call, kvs_status_str(st_),             \
              kvs_last_error());                                                     \
      exit(1);                                                                       \
    }                                                                                \
  } while (0)

/* Expect a specific failure; the message must not be empty. */
static void expect_status(kvs_status got, kvs_status want, const char *what) {
  if (got != want || kvs_last_error()[0] == '\0') {
    fprintf(stderr, "%s: expected %s, got %s (%s)\n", what, kvs_status_str(want),
            kvs_status_str(got), kvs_last_error());
    exit(1);
  }
  printf("refused as expected (%s): %s\n", kvs_status_str(got), kvs_last_error());
}

static const char DEFAULT_CONFIG[] =
    "[sparsity]\n"
    "policy = \"snapkv\"\n"
    "budget_tokens = 1024\n"
    "sink_tokens = 4\n"
    "recent_tokens = 64\n"
    "window = 32\n"
    "min_length = 1536\n";

/*
 * One layer of one sequence end to end: a small f32 NHD cache whose values encode their
 * (token, head, dim), knorm scores, selection of the planned count, then compaction twice:
 * out of place into fresh blocks (the row is only read, as when its blocks are shared through
 * a prefix cache), and in place. The checks: every kept slot holds the token the selection
 * chose, the out-of-place form left the row untouched, and the in-place form released the tail
 * of the row.
 */
enum { BS = 16, HEADS = 2, DIM = 8, NBLOCKS = 11, CACHED = 100 };

/* Slot j of head h in `blocks` holds the token keep[h][j] chose. */
static int holds_kept(const float *v, const int32_t *blocks, const uint32_t *keep,
                      uint32_t selected, const char *what) {
  for (uint32_t h = 0; h < HEADS; h++)
    for (uint32_t j = 0; j < selected; j++) {
      uint32_t t = keep[h * selected + j];
      size_t at = (((size_t)blocks[j / BS] * BS + j % BS) * HEADS + h) * DIM;
      if (v[at] != (float)(t * 1000 + h * 100)) {
        fprintf(stderr, "%s: head %u slot %u holds %.0f, expected token %u\n", what, h, j, v[at],
                t);
        return 1;
      }
    }
  return 0;
}

static int compact_one_sequence(void) {
  static float k[NBLOCKS * BS * HEADS * DIM], v[NBLOCKS * BS * HEADS * DIM];
  /* 7 blocks hold 100 tokens; blocks 4, 8, 9 and 10 are free. */
  const int32_t row[] = {5, 0, 7, 2, 6, 1, 3};
  for (int i = 0; i < 7; i++)
    for (int s = 0; s < BS; s++)
      for (int h = 0; h < HEADS; h++)
        for (int d = 0; d < DIM; d++) {
          int t = i * BS + s;
          size_t at = (((size_t)row[i] * BS + s) * HEADS + h) * DIM + d;
          /* Later tokens get smaller keys, so knorm prefers them; values encode the token. */
          k[at] = 1.0f + (float)((t * 7919) % 97) / 10.0f;
          v[at] = (float)(t * 1000 + h * 100 + d);
        }
  kvs_kernels *kernels = NULL;
  CHECK(kvs_kernels_new_cpu(&kernels));
  kvs_kv_cache cache = {.k = k, .v = v, .dtype = KVS_DTYPE_F32, .layout = KVS_LAYOUT_NHD,
                        .device = KVS_DEVICE_CPU, .num_blocks = NBLOCKS, .block_size = BS,
                        .num_kv_heads = HEADS, .head_dim = DIM};
  kvs_sequence seq = {.row = row, .row_len = 7, .cached_len = CACHED, .protected_len = 0};
  // Scratch for the longest sequence, up front (on CUDA it is allocated here, before the engine
  // sizes its KV cache; the CPU backend only checks the geometry).
  CHECK(kvs_kernels_reserve(kernels, &cache, NBLOCKS * BS, 0, 0));

  kvs_config *small = NULL;
  const char *text = "[sparsity]\npolicy = \"knorm\"\nbudget_tokens = 40\nsink_tokens = 4\n"
                     "recent_tokens = 8\n";
  CHECK(kvs_config_from_str(text, strlen(text), &small));
  kvs_sequence_lengths lens = {.logical_len = CACHED, .cached_len = CACHED, .block_size = BS};
  kvs_keep_plan plan;
  CHECK(kvs_plan_keep_count(small, KVS_PHASE_PREFILL, &lens, &plan));
  kvs_policy_params params;
  CHECK(kvs_config_policy_params(small, KVS_PHASE_PREFILL, &params));

  float scores[HEADS * CACHED];
  CHECK(kvs_score_knorm(kernels, &cache, &seq, scores, HEADS * CACHED));
  uint32_t keep[HEADS * CACHED];
  kvs_token_select sel = {.cached_len = CACHED, .protected_len = 0,
                          .sink_tokens = params.sink_tokens,
                          .protected_tail = params.protected_tail,
                          .selected = (uint32_t)plan.selected_tokens};
  size_t keep_len = HEADS * (size_t)sel.selected;
  CHECK(kvs_select_tokens(kernels, scores, HEADS * CACHED, HEADS, &sel, keep, keep_len));

  /* Out of place: the 52 kept tokens into ceil(52 / BS) = 4 fresh blocks; every byte of the row
     stays as it was. A destination block that is in the row is refused before anything moves. */
  static float v_before[NBLOCKS * BS * HEADS * DIM];
  memcpy(v_before, v, sizeof v);
  const int32_t dest[] = {9, 4, 10, 8}, overlapping[] = {9, 5, 10, 8};
  expect_status(kvs_compact_into(kernels, &cache, &seq, keep, keep_len, sel.selected, overlapping,
                                 4),
                KVS_STATUS_INVALID_ARGUMENT, "a destination block inside the row");
  expect_status(kvs_compact_into_check(kernels, &cache, &seq, keep, keep_len, sel.selected, dest,
                                       3),
                KVS_STATUS_INVALID_ARGUMENT, "too few destination blocks");
  CHECK(kvs_compact_into_check(kernels, &cache, &seq, keep, keep_len, sel.selected, dest, 4));
  CHECK(kvs_compact_into(kernels, &cache, &seq, keep, keep_len, sel.selected, dest, 4));
  if (holds_kept(v, dest, keep, sel.selected, "out of place")) return 1;
  for (int i = 0; i < 7; i++)
    if (memcmp(&v[(size_t)row[i] * BS * HEADS * DIM], &v_before[(size_t)row[i] * BS * HEADS * DIM],
               sizeof(float) * BS * HEADS * DIM) != 0) {
      fprintf(stderr, "out-of-place compaction wrote row block %d\n", row[i]);
      return 1;
    }
  printf("compacted out of place into blocks 9 4 10 8; the row is unchanged\n");

  int32_t released[8];
  uint32_t num_released = 0;
  /* An engine compacting several layers checks every layer first, so a refusal never leaves
     some layers compacted: kvs_compact_check validates exactly what kvs_compact will do. */
  CHECK(kvs_compact_check(kernels, &cache, &seq, keep, keep_len, sel.selected, 8));
  expect_status(kvs_compact_check(kernels, &cache, &seq, keep, keep_len, sel.selected, 1),
                KVS_STATUS_BUFFER_TOO_SMALL, "released capacity below the blocks released");
  CHECK(kvs_compact(kernels, &cache, &seq, keep, keep_len, sel.selected, released, 8,
                    &num_released));
  if (num_released != plan.released_blocks) {
    fprintf(stderr, "released %u blocks, plan said %" PRIu64 "\n", num_released,
            plan.released_blocks);
    return 1;
  }
  if (holds_kept(v, row, keep, sel.selected, "in place")) return 1;
  printf("compacted %u -> %" PRIu64 " tokens per head, released blocks:", CACHED,
         plan.kept_tokens);
  for (uint32_t i = 0; i < num_released; i++) printf(" %d", released[i]);
  printf("\n");
  kvs_config_free(small);
  kvs_kernels_free(kernels);
  return 0;
}

int main(int argc, char **argv) {
  if (kvs_abi_version() != KVS_ABI_VERSION) {
    fprintf(stderr, "kvsieve ABI %u, header expects %u\n", kvs_abi_version(), KVS_ABI_VERSION);
    return 1;
  }
  printf("kvsieve %s (ABI %u)\n", kvs_version(), kvs_abi_version());

  kvs_config *config = NULL;
  if (argc > 1) {
    CHECK(kvs_config_from_file(argv[1], &config));
  } else {
    CHECK(kvs_config_from_str(DEFAULT_CONFIG, strlen(DEFAULT_CONFIG), &config));
  }

  kvs_policy_params params;
  CHECK(kvs_config_policy_params(config, KVS_PHASE_PREFILL, &params));
  printf("policy %u, budget %u tokens (ratio %.3f), sinks %u, protected tail %u\n",
         params.policy, params.budget_tokens, params.budget_ratio, params.sink_tokens,
         params.protected_tail);

  const uint32_t block_size = 16;
  const uint64_t prompts[] = {1000, 4096, 8000, 32768};
  uint64_t blocks_before = 0, blocks_after = 0;
  printf("%10s %10s %10s %10s\n", "prompt", "kept", "evicted", "released");
  for (size_t i = 0; i < sizeof prompts / sizeof prompts[0]; i++) {
    kvs_sequence_lengths lens = {
        .logical_len = prompts[i],
        .cached_len = prompts[i],
        .protected_len = 0,
        .block_size = block_size,
    };
    kvs_keep_plan plan;
    CHECK(kvs_plan_keep_count(config, KVS_PHASE_PREFILL, &lens, &plan));
    if (plan.kept_tokens + plan.evicted_tokens != lens.cached_len ||
        plan.evicted_tokens != plan.released_blocks * block_size) {
      fprintf(stderr, "plan breaks its invariants for %" PRIu64 " tokens\n", prompts[i]);
      return 1;
    }
    blocks_before += (lens.cached_len + block_size - 1) / block_size;
    blocks_after += (plan.kept_tokens + block_size - 1) / block_size;
    printf("%10" PRIu64 " %10" PRIu64 " %10" PRIu64 " %10" PRIu64 "\n", prompts[i],
           plan.kept_tokens, plan.evicted_tokens, plan.released_blocks);
  }
  printf("KV blocks: %" PRIu64 " -> %" PRIu64 "\n", blocks_before, blocks_after);

  if (compact_one_sequence() != 0) return 1;

  /* Bad input gets a status and a message, and leaves the out-param alone. */
  kvs_keep_plan untouched = {.kept_tokens = 42};
  kvs_sequence_lengths bad = {.logical_len = 10, .cached_len = 20, .block_size = block_size};
  expect_status(kvs_plan_keep_count(config, KVS_PHASE_PREFILL, &bad, &untouched),
                KVS_STATUS_INVALID_ARGUMENT, "cached_len > logical_len");
  expect_status(kvs_plan_keep_count(NULL, KVS_PHASE_PREFILL, &bad, &untouched),
                KVS_STATUS_INVALID_ARGUMENT, "NULL config");
  if (untouched.kept_tokens != 42) {
    fprintf(stderr, "out-param written on failure\n");
    return 1;
  }
  const char *broken = "[sparsity]\npolicy = \"snapkv\"\nbudget_ratio = 1.5\n";
  kvs_config *never = NULL;
  expect_status(kvs_config_from_str(broken, strlen(broken), &never), KVS_STATUS_CONFIG_INVALID,
                "ratio out of range");
  if (never != NULL) return 1;

  kvs_config_free(config);
  kvs_config_free(NULL);
  printf("ok\n");
  return 0;
}
