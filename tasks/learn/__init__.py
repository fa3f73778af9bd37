"""Learning from a judge: the query log, judges behind one protocol (local Gemma, api,
cross-encoder), the judgement cache and the training rows the judge's labels become."""
