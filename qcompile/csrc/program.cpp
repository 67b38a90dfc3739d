// A lowered graph as one native call.
//
// Python (qcompile/program.py) reads the fx graph once and adds each node here as an instruction:
// an operator's dispatcher handle and its argument stack, with every constant already converted to
// the IValue its schema names, and where each node-valued argument comes from (a slot: an input,
// or an earlier instruction's output); or, for a node that is no operator, a Python callable.
// run() then makes the calls in graph order, operators through c10::Dispatcher::callBoxed. The
// kernels are the same and run in the same order with the same arguments as the fx GraphModule's
// Python code, so the results are the same bits; what goes is the per-node cost of a Python call
// into torch.ops (parsing each argument against the schema again: 5-7 us for a view).
//
// Slots whose last reader has run are cleared, as the fx code sets dead names to None, so peak
// memory is the same. An operator that is the last reader of a value, reading it once, is handed
// the value itself (moved out of its slot) rather than a copy of the reference: if nothing else
// holds the tensor, the kernel then holds the only reference to it, and may reuse its memory
// (conv2d_int8 accumulates its residual add into a uint8 `other` so held, rather than into a
// copy). Nothing can observe that: no slot, Python name or view refers to the tensor any more.
// The GIL is released while the instructions run; a Python call, or an operator implemented in
// Python, takes it back.
#include "program.h"

#include <ATen/ScalarOps.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include <algorithm>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace qcompile {
namespace {

// A list argument with node-valued items (a shape holding a symbolic size, a tensor list): built
// when the program runs. An item with slot < 0 is the constant beside it.
struct ListArgument {
  size_t position;
  c10::TypePtr element;
  std::vector<std::pair<int64_t, c10::IValue>> items;
};

struct Instruction {
  std::string node;
  std::optional<c10::OperatorHandle> op;  // none: a Python call, or outputs[0] = item `index` of `source`
  py::object function;                    // a Python callable taking the `slots` values in order
  std::vector<c10::IValue> stack;         // the arguments, constants in place
  std::vector<std::pair<size_t, int64_t>> slots;  // (stack position, slot) filled at run time
  std::vector<bool> handed;  // per entry of `slots`: moved into the stack, this being its last reader
  std::vector<ListArgument> lists;
  std::vector<int64_t> outputs;  // the slot of each returned value, -1 for one nobody reads
  std::vector<int64_t> release;  // slots this instruction is the last reader of
  int64_t source = -1;
  int64_t index = 0;
};

// The type a list argument's items take: through Optional, SymInt as int (sizes are concrete
// when the program runs).
c10::TypePtr list_element(const c10::TypePtr& type) {
  c10::TypePtr list = type;
  if (auto optional = list->cast<c10::OptionalType>()) list = optional->getElementType();
  auto as_list = list->cast<c10::ListType>();
  if (!as_list) return nullptr;
  c10::TypePtr element = as_list->getElementType();
  if (element->kind() == c10::TypeKind::SymIntType) return c10::IntType::get();
  return element;
}

class Program {
 public:
  explicit Program(int64_t slots) : slots_(slots) {}

  // One operator node: `arguments` holds every schema argument in order (positional ones, then
  // keywords, then defaults), None where `slots` or `lists` give the value at run time. A list
  // item is an int slot or ("constant", value).
  void call(const std::string& node, const std::string& name, const std::string& overload, const py::list& arguments,
            const std::vector<std::pair<size_t, int64_t>>& slots, const py::list& lists,
            const std::vector<int64_t>& outputs, const std::vector<int64_t>& release) {
    Instruction instruction;
    instruction.node = node;
    instruction.op.emplace(c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str()));
    const auto& schema = instruction.op->schema();
    const auto& expected = schema.arguments();
    TORCH_CHECK(arguments.size() == expected.size(), "node '", node, "': ", arguments.size(), " arguments for ",
                schema);
    TORCH_CHECK(outputs.size() == schema.returns().size(), "node '", node, "': ", outputs.size(),
                " output slots for ", schema);
    std::vector<bool> filled(expected.size(), false);
    for (const auto& [position, slot] : slots) {
      check_slot(node, slot);
      TORCH_CHECK(position < expected.size(), "node '", node, "': no argument ", position);
      filled[position] = true;
    }
    for (const auto& entry : lists) {
      auto spec = entry.cast<py::tuple>();
      ListArgument list;
      list.position = spec[0].cast<size_t>();
      TORCH_CHECK(list.position < expected.size(), "node '", node, "': no argument ", list.position);
      list.element = list_element(expected[list.position].type());
      TORCH_CHECK(list.element, "node '", node, "': argument '", expected[list.position].name(), "' is not a list");
      for (const auto& item : spec[1].cast<py::list>()) {
        if (py::isinstance<py::int_>(item)) {
          int64_t slot = item.cast<int64_t>();
          check_slot(node, slot);
          list.items.emplace_back(slot, c10::IValue());
        } else {
          list.items.emplace_back(-1, torch::jit::toIValue(item.cast<py::tuple>()[1], list.element));
        }
      }
      filled[list.position] = true;
      instruction.lists.push_back(std::move(list));
    }
    for (size_t i = 0; i < expected.size(); ++i) {
      instruction.stack.push_back(filled[i] ? c10::IValue() : constant(arguments[i], expected[i].type()));
    }
    instruction.slots = slots;
    for (int64_t slot : outputs) {
      if (slot >= 0) check_slot(node, slot);
    }
    instruction.outputs = outputs;
    set_release(instruction, release);
    hand_over_last_reads(instruction);
    instructions_.push_back(std::move(instruction));
  }

  // outputs[0] = source[index], for a node taking one value of an operator's list result.
  void item(const std::string& node, int64_t source, int64_t index, int64_t output,
            const std::vector<int64_t>& release) {
    check_slot(node, source);
    check_slot(node, output);
    Instruction instruction;
    instruction.node = node;
    instruction.source = source;
    instruction.index = index;
    instruction.outputs = {output};
    set_release(instruction, release);
    instructions_.push_back(std::move(instruction));
  }

  // outputs[0] = function(*slots): a node that is no operator (a Python function, a submodule),
  // called with the GIL held.
  void python(const std::string& node, const py::function& function, const std::vector<int64_t>& slots,
              int64_t output, const std::vector<int64_t>& release) {
    for (int64_t slot : slots) check_slot(node, slot);
    check_slot(node, output);
    Instruction instruction;
    instruction.node = node;
    instruction.function = function;
    for (size_t i = 0; i < slots.size(); ++i) instruction.slots.emplace_back(i, slots[i]);
    instruction.outputs = {output};
    set_release(instruction, release);
    instructions_.push_back(std::move(instruction));
  }

  // Runs the instructions with `inputs` in slots 0.., and returns the values in `results`.
  py::list run(const py::sequence& inputs, const std::vector<int64_t>& results) {
    TORCH_CHECK(static_cast<int64_t>(inputs.size()) <= slots_, "the program has ", slots_, " slots, got ",
                inputs.size(), " inputs");
    std::vector<c10::IValue> values(slots_);
    for (size_t i = 0; i < inputs.size(); ++i) values[i] = from_python(inputs[i]);
    {
      py::gil_scoped_release released;
      torch::jit::Stack stack;
      for (const auto& instruction : instructions_) {
        execute(instruction, values, stack);
        for (int64_t slot : instruction.release) values[slot] = c10::IValue();
      }
    }
    py::list out;
    for (int64_t slot : results) {
      check_slot("output", slot);
      out.append(torch::jit::toPyObject(values[slot]));
    }
    return out;
  }

  size_t size() const { return instructions_.size(); }

 private:
  void check_slot(const std::string& node, int64_t slot) const {
    TORCH_CHECK(slot >= 0 && slot < slots_, "node '", node, "': slot ", slot, " outside the program's ", slots_);
  }

  void set_release(Instruction& instruction, const std::vector<int64_t>& release) const {
    for (int64_t slot : release) check_slot(instruction.node, slot);
    instruction.release = release;
  }

  // Marks the argument slots the operator may be handed: released by this instruction and read by
  // it once (not twice, not also inside a list argument).
  static void hand_over_last_reads(Instruction& instruction) {
    std::vector<int64_t> reads;
    for (const auto& entry : instruction.slots) reads.push_back(entry.second);
    for (const auto& list : instruction.lists) {
      for (const auto& item : list.items) reads.push_back(item.first);
    }
    const auto& released = instruction.release;
    for (const auto& entry : instruction.slots) {
      const int64_t slot = entry.second;
      instruction.handed.push_back(std::count(reads.begin(), reads.end(), slot) == 1 &&
                                   std::find(released.begin(), released.end(), slot) != released.end());
    }
  }

  // A constant argument as its schema type takes it. A Python number where a tensor goes (x + 1
  // traced as aten.add.Tensor) becomes the 0-dim "wrapped number" tensor torch's argument parser
  // makes of it, which type promotion treats as a scalar.
  static c10::IValue constant(const py::handle& value, const c10::TypePtr& type) {
    bool tensor = type->kind() == c10::TypeKind::TensorType ||
                  (type->kind() == c10::TypeKind::OptionalType &&
                   type->castRaw<c10::OptionalType>()->getElementType()->kind() == c10::TypeKind::TensorType);
    bool number = py::isinstance<py::int_>(value) || py::isinstance<py::float_>(value);
    if (!tensor || !number) return torch::jit::toIValue(value, type);
    c10::Scalar scalar = py::isinstance<py::bool_>(value) ? c10::Scalar(value.cast<bool>())
                         : py::isinstance<py::int_>(value) ? c10::Scalar(value.cast<int64_t>())
                                                           : c10::Scalar(value.cast<double>());
    at::Tensor wrapped = c10::scalar_to_tensor(scalar);
    wrapped.unsafeGetTensorImpl()->set_wrapped_number(true);
    return wrapped;
  }

  // A value from Python (an input, a Python call's result): a tensor, an int / float / bool,
  // None, or a tuple or list of these.
  static c10::IValue from_python(const py::handle& value) {
    if (THPVariable_Check(value.ptr())) return value.cast<at::Tensor>();
    if (value.is_none()) return c10::IValue();
    if (py::isinstance<py::bool_>(value)) return value.cast<bool>();
    if (py::isinstance<py::int_>(value)) return value.cast<int64_t>();
    if (py::isinstance<py::float_>(value)) return value.cast<double>();
    if (py::isinstance<py::tuple>(value) || py::isinstance<py::list>(value)) {
      std::vector<c10::IValue> items;
      for (const auto& item : value) items.push_back(from_python(item));
      return c10::ivalue::Tuple::create(std::move(items));
    }
    throw std::invalid_argument(std::string("the program holds tensors, numbers, None and tuples of them; got a ") +
                                Py_TYPE(value.ptr())->tp_name);
  }

  static void call_python(const Instruction& instruction, std::vector<c10::IValue>& values) {
    py::gil_scoped_acquire held;
    py::tuple arguments(instruction.slots.size());
    for (size_t i = 0; i < instruction.slots.size(); ++i) {
      arguments[i] = torch::jit::toPyObject(values[instruction.slots[i].second]);
    }
    values[instruction.outputs[0]] = from_python(instruction.function(*arguments));
  }

  static void execute(const Instruction& instruction, std::vector<c10::IValue>& values, torch::jit::Stack& stack) {
    if (instruction.function) {
      call_python(instruction, values);
      return;
    }
    if (!instruction.op) {
      const c10::IValue& source = values[instruction.source];
      TORCH_CHECK(source.isList() || source.isTuple(), "node '", instruction.node, "' takes an item of a ",
                  source.tagKind());
      values[instruction.outputs[0]] = source.isList() ? source.toListRef().at(instruction.index)
                                                       : source.toTupleRef().elements().at(instruction.index);
      return;
    }
    stack.assign(instruction.stack.begin(), instruction.stack.end());
    for (size_t i = 0; i < instruction.slots.size(); ++i) {
      const auto& [position, slot] = instruction.slots[i];
      stack[position] = instruction.handed[i] ? std::move(values[slot]) : values[slot];
    }
    for (const auto& list : instruction.lists) {
      c10::impl::GenericList items(list.element);
      items.reserve(list.items.size());
      for (const auto& [slot, constant] : list.items) items.push_back(slot >= 0 ? values[slot] : constant);
      stack[list.position] = std::move(items);
    }
    try {
      instruction.op->callBoxed(stack);
    } catch (const py::error_already_set&) {
      throw;  // an operator implemented in Python: its own exception, as the fx code would raise it
    } catch (const c10::Error& error) {
      throw std::runtime_error("node '" + instruction.node + "' (" + instruction.op->schema().name() + "): " +
                               error.what_without_backtrace());
    }
    for (size_t i = 0; i < instruction.outputs.size(); ++i) {
      if (instruction.outputs[i] >= 0) values[instruction.outputs[i]] = std::move(stack[i]);
    }
  }

  int64_t slots_;
  std::vector<Instruction> instructions_;
};

}  // namespace

void bind_program(py::module& module) {
  py::class_<Program>(module, "Program",
                      "A lowered graph's nodes as dispatcher calls over value slots, run in one native call "
                      "(built by qcompile.program).")
      .def(py::init<int64_t>(), py::arg("slots"))
      .def("call", &Program::call, py::arg("node"), py::arg("name"), py::arg("overload"), py::arg("arguments"),
           py::arg("slots"), py::arg("lists"), py::arg("outputs"), py::arg("release"))
      .def("item", &Program::item, py::arg("node"), py::arg("source"), py::arg("index"), py::arg("output"),
           py::arg("release"))
      .def("python", &Program::python, py::arg("node"), py::arg("function"), py::arg("slots"), py::arg("output"),
           py::arg("release"))
      .def("run", &Program::run, py::arg("inputs"), py::arg("results"))
      .def("__len__", &Program::size);
}

}  // namespace qcompile
