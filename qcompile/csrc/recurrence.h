#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace qcompile {

// The recurrent half of a GRU layer (one direction): from the input gates Gx = x·W_ihᵀ + b_ih of
// every step, h_t = GRU(Gx_t, h_{t-1}). Returns (every h_t, the last h).
std::tuple<at::Tensor, at::Tensor> gru_recurrence(const at::Tensor& gates_x, const at::Tensor& h0,
                                                  const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                                                  bool reverse, bool batch_first);

// The recurrent half of an LSTM layer (one direction). Returns (every h_t, the last h, the last c).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_recurrence(const at::Tensor& gates_x, const at::Tensor& h0,
                                                               const at::Tensor& c0, const at::Tensor& w_hh,
                                                               const std::optional<at::Tensor>& b_hh, bool reverse,
                                                               bool batch_first);

}  // namespace qcompile
