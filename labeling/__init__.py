"""Pseudo-labeling: teacher wrappers (`teachers`), the job's config (`config`), the Ray job (`job`), the
`multimae-label` CLI (`cli`) and the script that trains the shipped small teachers (`train_teachers`)."""
