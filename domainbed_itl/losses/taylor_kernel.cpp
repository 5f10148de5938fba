// Fused CPU kernel of the fixed-omega Taylor loss (see taylor.py, _FixedTaylorLoss).
//
// For each row b of the logits: softmax, then with P0 and D = P1 - P0 the polynomial's values for
// y = 0 and the true-class difference, value[b] = sum_c P0(p_c) + D(p_t) + constant and, when
// asked, the closed-form logit gradient R - p * (sum_c R_c + T) + e_t T with R_c = p_c P0'(p_c),
// T = p_t D'(p_t). m0 and md are (K, 2) tables of [coefficient of p^k, k * that coefficient] for
// k = 1..K, with the -1/C scale already folded in (and into `constant`).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

std::vector<torch::Tensor> taylor_forward(torch::Tensor logits, torch::Tensor target,
                                          torch::Tensor m0, torch::Tensor md, double constant,
                                          bool need_grad) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu(), "logits must be a 2-D CPU tensor");
  TORCH_CHECK(target.scalar_type() == torch::kLong && target.dim() == 1 &&
                  target.size(0) == logits.size(0),
              "target must be int64 class indices of shape (batch,)");
  auto z = logits.contiguous();
  auto t = target.contiguous();
  const int64_t batch = z.size(0), classes = z.size(1), order = m0.size(0);
  auto value = torch::empty({batch}, z.options());
  auto grad = need_grad ? torch::empty({batch, classes}, z.options()) : torch::empty({0}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "taylor_forward", [&] {
    auto a = m0.to(z.scalar_type()).contiguous();
    auto d = md.to(z.scalar_type()).contiguous();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const int64_t* tp = t.data_ptr<int64_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* dp = d.data_ptr<scalar_t>();
    scalar_t* vp = value.data_ptr<scalar_t>();
    scalar_t* gp = need_grad ? grad.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, batch, 256, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> p(classes), r(classes);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t label = tp[b];
        TORCH_CHECK(label >= 0 && label < classes, "target ", label, " is out of range for ",
                    classes, " classes");
        const scalar_t* zb = zp + b * classes;
        scalar_t top = zb[0];
        for (int64_t c = 1; c < classes; ++c) top = std::max(top, zb[c]);
        scalar_t norm = 0;
        for (int64_t c = 0; c < classes; ++c) {
          p[c] = std::exp(zb[c] - top);
          norm += p[c];
        }
        scalar_t total = 0, r_sum = 0;
        for (int64_t c = 0; c < classes; ++c) {
          p[c] /= norm;
          scalar_t power = p[c], v = 0, rc = 0;
          for (int64_t k = 0; k < order; ++k) {
            v += ap[2 * k] * power;
            rc += ap[2 * k + 1] * power;
            power *= p[c];
          }
          total += v;
          r[c] = rc;
          r_sum += rc;
        }
        scalar_t power = p[label], dv = 0, dt = 0;
        for (int64_t k = 0; k < order; ++k) {
          dv += dp[2 * k] * power;
          dt += dp[2 * k + 1] * power;
          power *= p[label];
        }
        vp[b] = total + dv + static_cast<scalar_t>(constant);
        if (need_grad) {
          scalar_t* g = gp + b * classes;
          const scalar_t s = r_sum + dt;
          for (int64_t c = 0; c < classes; ++c) g[c] = r[c] - p[c] * s;
          g[label] += dt;
        }
      }
    });
  });
  return {value, grad};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("taylor_forward", &taylor_forward, "Fused Taylor loss value and logit gradient (CPU)");
}
