namespace SwitchNorm
module Placeholder = let x = 1
