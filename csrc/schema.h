// Schema pieces of the neptune_step_ operator family (library.cpp defines the operator;
// simt/operator.cpp a testing twin with the same arguments).
#pragma once

#define NEPTUNE_STEP_ARGS                                                                          \
  "Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "       \
  "Tensor(d!)[] steps, *, "
#define NEPTUNE_STEP_KWARGS                                                                        \
  "float beta1, float beta2, float weight_decay, float eps, float clip, bool cautious, "          \
  "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None"
