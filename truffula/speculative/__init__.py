"""Speculative decoding: drafts proposed on the host, verified by the target model in one step.

Verification is plain sampling. A sequence with k drafted tokens is scheduled with k + 1 query
tokens (its last known token and the drafts); each of the k + 1 positions is sampled exactly as
an ordinary decode would be (same processing, penalties over the history including the drafts
before it, same records), and the longest prefix of drafts equal to the samples is accepted,
followed by the first sample that differs (or the sample after the last draft). For drafts that
are a deterministic function of the history (prompt lookup, a greedy draft model) this is
rejection sampling: a draft d is accepted with probability p(d), and on rejection the sample
is drawn from p conditioned on differing from d, which is p with d removed and renormalised. So
the output distribution is the target model's, and every token's logprob, rank and alternatives
are those of its own position, as without speculation.
"""
