//! A small interpreter for the conditions a pattern step evaluates per partial match
//! (`temperature > a.temperature + 5`): one event against one earlier step's captured
//! event, where building a one-row Arrow batch for DataFusion would cost far more than the
//! comparison. It covers columns, literals, arithmetic, comparisons, `and`/`or`/`not` and
//! `is [not] null`, with SQL's null semantics and numeric promotion; any other expression
//! is evaluated by DataFusion instead (the planner keeps both).

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type, TimestampNanosecondType};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};

/// A compiled condition.
#[derive(Debug, Clone)]
pub enum ScalarExpr {
    /// Column `i` of the evaluation row.
    Column(usize),
    /// A constant.
    Literal(Value),
    /// `left op right`.
    Binary(Box<ScalarExpr>, Op, Box<ScalarExpr>),
    /// `not e`.
    Not(Box<ScalarExpr>),
    /// `e is null` (`true`) or `e is not null` (`false`).
    IsNull(Box<ScalarExpr>, bool),
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `=`
    Eq,
    /// `<>`
    NotEq,
    /// `<`
    Lt,
    /// `<=`
    LtEq,
    /// `>`
    Gt,
    /// `>=`
    GtEq,
    /// `and`
    And,
    /// `or`
    Or,
}

/// A value during evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL null.
    Null,
    /// Boolean.
    Bool(bool),
    /// Integer (also timestamps, in nanoseconds).
    Int(i64),
    /// Float.
    Float(f64),
    /// String.
    Str(String),
}

impl ScalarExpr {
    /// Indices of the columns the expression reads.
    pub fn columns(&self, out: &mut Vec<usize>) {
        match self {
            ScalarExpr::Column(i) => out.push(*i),
            ScalarExpr::Literal(_) => {}
            ScalarExpr::Binary(l, _, r) => {
                l.columns(out);
                r.columns(out);
            }
            ScalarExpr::Not(e) | ScalarExpr::IsNull(e, _) => e.columns(out),
        }
    }

    /// Compiles `expr`, whose columns are named as in `columns` (in evaluation order).
    /// Returns `None` for expressions outside the supported subset.
    pub fn compile(expr: &Expr, columns: &[String]) -> Option<Self> {
        Some(match expr {
            Expr::Column(c) => {
                let name = match &c.relation {
                    Some(r) => format!("{r}.{}", c.name),
                    None => c.name.clone(),
                };
                ScalarExpr::Column(columns.iter().position(|n| *n == name)?)
            }
            Expr::Literal(v, _) => ScalarExpr::Literal(from_scalar(v)?),
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                let op = match op {
                    Operator::Plus => Op::Add,
                    Operator::Minus => Op::Sub,
                    Operator::Multiply => Op::Mul,
                    Operator::Divide => Op::Div,
                    Operator::Eq => Op::Eq,
                    Operator::NotEq => Op::NotEq,
                    Operator::Lt => Op::Lt,
                    Operator::LtEq => Op::LtEq,
                    Operator::Gt => Op::Gt,
                    Operator::GtEq => Op::GtEq,
                    Operator::And => Op::And,
                    Operator::Or => Op::Or,
                    _ => return None,
                };
                ScalarExpr::Binary(
                    Box::new(Self::compile(left, columns)?),
                    op,
                    Box::new(Self::compile(right, columns)?),
                )
            }
            Expr::Not(e) => ScalarExpr::Not(Box::new(Self::compile(e, columns)?)),
            Expr::IsNull(e) => ScalarExpr::IsNull(Box::new(Self::compile(e, columns)?), true),
            Expr::IsNotNull(e) => ScalarExpr::IsNull(Box::new(Self::compile(e, columns)?), false),
            _ => return None,
        })
    }

    /// Evaluates over a row whose first columns are row `row` of `batch` and whose next
    /// ones `captured(k)` gives (the k-th column after the batch's).
    pub fn eval(&self, batch: &[ArrayRef], row: usize, captured: &dyn Fn(usize) -> Value) -> Value {
        match self {
            ScalarExpr::Column(i) => {
                if *i < batch.len() {
                    return from_array(&batch[*i], row);
                }
                captured(*i - batch.len())
            }
            ScalarExpr::Literal(v) => v.clone(),
            ScalarExpr::Not(e) => match e.eval(batch, row, captured) {
                Value::Bool(b) => Value::Bool(!b),
                _ => Value::Null,
            },
            ScalarExpr::IsNull(e, want) => Value::Bool((e.eval(batch, row, captured) == Value::Null) == *want),
            ScalarExpr::Binary(l, op, r) => {
                let lv = l.eval(batch, row, captured);
                if *op == Op::And && lv == Value::Bool(false) {
                    return Value::Bool(false);
                }
                if *op == Op::Or && lv == Value::Bool(true) {
                    return Value::Bool(true);
                }
                binary(&lv, *op, &r.eval(batch, row, captured))
            }
        }
    }

    /// Whether the condition holds (null is false).
    pub fn holds(&self, batch: &[ArrayRef], row: usize, captured: &dyn Fn(usize) -> Value) -> bool {
        self.eval(batch, row, captured) == Value::Bool(true)
    }
}

/// One column of type `ty` from scalars (operator outputs built row by row): untyped nulls
/// take the column's type, and values of another type are cast to it.
pub fn column_of(values: Vec<ScalarValue>, ty: &DataType) -> datafusion::error::Result<ArrayRef> {
    if values.is_empty() {
        return Ok(arrow::array::new_empty_array(ty));
    }
    let typed = values.into_iter().map(|v| if v.is_null() { ScalarValue::try_from(ty).unwrap_or(v) } else { v });
    let arr = ScalarValue::iter_to_array(typed)?;
    Ok(if arr.data_type() == ty { arr } else { arrow::compute::cast(&arr, ty)? })
}

/// The value of a scalar (`None`: a type the interpreter does not handle).
pub fn from_scalar(v: &ScalarValue) -> Option<Value> {
    // The common present values first: `is_null` is a long match of its own.
    Some(match v {
        ScalarValue::Float64(Some(x)) => Value::Float(*x),
        ScalarValue::Int64(Some(x)) => Value::Int(*x),
        ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => {
            Value::Str(s.clone())
        }
        ScalarValue::Boolean(Some(b)) => Value::Bool(*b),
        ScalarValue::TimestampNanosecond(Some(x), _) => Value::Int(*x),
        ScalarValue::Int8(Some(x)) => Value::Int(i64::from(*x)),
        ScalarValue::Int16(Some(x)) => Value::Int(i64::from(*x)),
        ScalarValue::Int32(Some(x)) => Value::Int(i64::from(*x)),
        ScalarValue::UInt8(Some(x)) => Value::Int(i64::from(*x)),
        ScalarValue::UInt16(Some(x)) => Value::Int(i64::from(*x)),
        ScalarValue::UInt32(Some(x)) => Value::Int(i64::from(*x)),
        ScalarValue::Float32(Some(x)) => Value::Float(f64::from(*x)),
        v if v.is_null() => Value::Null,
        _ => return None,
    })
}

fn from_array(a: &ArrayRef, row: usize) -> Value {
    if a.is_null(row) {
        return Value::Null;
    }
    match a.data_type() {
        DataType::Float64 => Value::Float(a.as_primitive::<Float64Type>().value(row)),
        DataType::Int64 => Value::Int(a.as_primitive::<Int64Type>().value(row)),
        DataType::Boolean => Value::Bool(a.as_boolean().value(row)),
        DataType::Utf8 => Value::Str(a.as_string::<i32>().value(row).to_owned()),
        DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, _) => {
            Value::Int(a.as_primitive::<TimestampNanosecondType>().value(row))
        }
        _ => ScalarValue::try_from_array(a, row).ok().and_then(|v| from_scalar(&v)).unwrap_or(Value::Null),
    }
}

fn binary(l: &Value, op: Op, r: &Value) -> Value {
    use Value::*;
    match op {
        Op::And => match (l, r) {
            (Bool(false), _) | (_, Bool(false)) => Bool(false),
            (Bool(true), Bool(true)) => Bool(true),
            _ => Null,
        },
        Op::Or => match (l, r) {
            (Bool(true), _) | (_, Bool(true)) => Bool(true),
            (Bool(false), Bool(false)) => Bool(false),
            _ => Null,
        },
        _ if *l == Null || *r == Null => Null,
        Op::Add | Op::Sub | Op::Mul | Op::Div => match (l, r) {
            (Int(a), Int(b)) => match op {
                Op::Add => a.checked_add(*b).map_or(Null, Int),
                Op::Sub => a.checked_sub(*b).map_or(Null, Int),
                Op::Mul => a.checked_mul(*b).map_or(Null, Int),
                _ => a.checked_div(*b).map_or(Null, Int),
            },
            _ => match (num(l), num(r)) {
                (Some(a), Some(b)) => Float(match op {
                    Op::Add => a + b,
                    Op::Sub => a - b,
                    Op::Mul => a * b,
                    _ => a / b,
                }),
                _ => Null,
            },
        },
        _ => {
            let ord = match (l, r) {
                (Int(a), Int(b)) => a.partial_cmp(b),
                (Str(a), Str(b)) => a.partial_cmp(b),
                (Bool(a), Bool(b)) => a.partial_cmp(b),
                _ => match (num(l), num(r)) {
                    (Some(a), Some(b)) => a.partial_cmp(&b),
                    _ => None,
                },
            };
            let Some(ord) = ord else { return Null };
            Bool(match op {
                Op::Eq => ord.is_eq(),
                Op::NotEq => !ord.is_eq(),
                Op::Lt => ord.is_lt(),
                Op::LtEq => ord.is_le(),
                Op::Gt => ord.is_gt(),
                _ => ord.is_ge(),
            })
        }
    }
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow::array::Float64Array;
    use datafusion::prelude::{col, lit};

    #[test]
    fn compares_an_event_with_a_captured_one() {
        let columns = vec!["temperature".to_owned(), "a.temperature".to_owned()];
        let e = col("temperature").gt(col("a.temperature") + lit(5i64));
        // `col("a.temperature")` parses as relation `a`, column `temperature`.
        let c = ScalarExpr::compile(&e, &columns).unwrap_or(ScalarExpr::Literal(Value::Null));
        let batch: Vec<ArrayRef> = vec![Arc::new(Float64Array::from(vec![Some(26.0), Some(24.0), None]))];
        let a = [ScalarValue::Float64(Some(20.0))];
        let captured = |k: usize| a.get(k).and_then(from_scalar).unwrap_or(Value::Null);
        assert!(c.holds(&batch, 0, &captured));
        assert!(!c.holds(&batch, 1, &captured));
        assert!(!c.holds(&batch, 2, &captured), "null is not true");
        assert_eq!(binary(&Value::Null, Op::Or, &Value::Bool(true)), Value::Bool(true));
        assert_eq!(binary(&Value::Int(1), Op::Div, &Value::Int(0)), Value::Null);
    }
}
