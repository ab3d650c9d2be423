//! Casting a module's float parameters to another dtype.

use burn::module::{ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// A [`ModuleMapper`] that casts every float parameter to one dtype (`module.map(&mut CastParams(F16))`).
pub struct CastParams(pub DType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let dtype = self.0;
        if param.val().dtype() == dtype {
            return param;
        }
        param.map(|t| t.cast(dtype))
    }
}
