//! Shared building blocks of ip2p.

#[cfg(test)]
mod tests {
    #[test]
    fn warm() {
        use burn::tensor::Tensor;
        type B = burn::backend::Flex;
        let d = Default::default();
        let t = Tensor::<B, 2>::ones([2, 2], &d);
        assert_eq!(t.sum().into_scalar(), 4.0);
    }
}
