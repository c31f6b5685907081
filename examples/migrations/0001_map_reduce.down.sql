-- Without CASCADE, the schema stays when it holds objects of someone else,
-- and this migration fails instead of dropping them.
DROP TABLE map_reduce.monomyth_applied;
DROP TABLE map_reduce.word_counts;
DROP SCHEMA map_reduce;
