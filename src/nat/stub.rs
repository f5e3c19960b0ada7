pub struct NftFirewall;
impl NftFirewall { pub fn new() -> Result<Self, super::NatError> { Ok(NftFirewall) } }
impl super::Firewall for NftFirewall {
    fn sync(&self, _: &crate::plan::Ruleset) -> Result<(), super::NatError> { todo!() }
    fn apply_ops(&self, _: &str, _: &str, _: &[crate::plan::ElementOp]) -> Result<(), super::NatError> { todo!() }
    fn delete_table(&self, _: &str) -> Result<(), super::NatError> { todo!() }
    fn table_exists(&self, _: &str) -> Result<bool, super::NatError> { todo!() }
    fn ensure_forward_accept(&self, _: &str, _: u32) -> Result<(), super::NatError> { todo!() }
    fn remove_forward_accept(&self, _: &str, _: u32) -> Result<(), super::NatError> { todo!() }
}
