"""Red-team tests: each test is an attack on the ALIGN-FL server, written the way an attacker would mount it.

Every test asserts (a) the attack is rejected or ignored with a ONE-LINE reason (in the round's record /
summary.json, or the raised error), (b) stored state is unharmed (generator store index and decoders, checkpoint),
and (c) where the global model is trained, it stays finite and no worse than the same run without the attacker.

Attack classes
1. Descriptor not pinned: other image_shape (1x32x32, 3x28x28), 'unconditional' layout in a classifier run, a
   label set other than the classes the run assigned (all ten classes, another silo's classes), look-alike class
   names (unicode), duplicate classes; a second round must not be poisoned.
2. Memory and compute: a tiny reply declaring a huge decoder (rejected without allocating: RSS < +200 MB); a
   decoder within the byte limit whose activations exceed max-sampling-mb; one within both whose compute per
   sample exceeds max-sample-mflops (rejected without drawing a sample).
3. Poison: finite +-3e38 weights (non-finite samples) rejected at the trial batch; a poisoned generator that got
   into the store is skipped, logged and quarantined; a non-finite server round is rolled back; the checkpoint
   never holds NaN.
4. Metrics: NaN/inf/1e18 num-examples, lists for numbers, wrong record kinds, extra ArrayRecord, 200k metric
   keys, a 1 MB string in the descriptor: rejected in one line, silo-mean accuracy not hijacked, summary.json small.
5. Identity: names outside silo-names, names never move (owner offline), a rejected switch keeps bindings,
   operator silo-nodes mapping, replies from nodes not asked, case-variant names, evaluate replies claiming a silo,
   operator withdrawal.
6. Config and files: path-like run-name / architecture names, huge seeds, inf/nan rates, a tampered store index,
   reuse of a run folder, corrupted dataset files, newer stored formats.
7. Sovereignty (test_silo_sovereignty.py): a run config re-homing, renaming or re-budgeting a silo; ledger edits.
8. In-contract generators (test_judging.py): another silo's decoder, with or without noise; blank, constant and
   latent-deaf decoders; replayed bytes.
9. Wrong classes (test_labels.py): swapped labels, another silo's classes drawn under a silo's own names, samples
   that pull the other silos' classes down (quarantine).
Own additions: descriptor round far in the future, zero-size / many tensors, case-variant and look-alike names,
evaluate replies from strangers with maximal counts, duplicate train / evaluate replies from one node, a node
claiming a silo's name first after a server restart (resume without silo-nodes).
"""
