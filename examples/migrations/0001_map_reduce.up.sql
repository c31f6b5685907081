-- The tables of the word-count example on PostgreSQL (examples/wordcount.py
-- with -p sink=postgres).
CREATE SCHEMA map_reduce;

-- One row per distinct word: a lowercased, whitespace-separated token.
CREATE TABLE map_reduce.word_counts (
    word TEXT PRIMARY KEY,
    word_count BIGINT NOT NULL
);

-- The ids of the items that the sink applied, so that an item delivered
-- again after a crash is not counted twice.
CREATE TABLE map_reduce.monomyth_applied (
    id TEXT PRIMARY KEY
);
